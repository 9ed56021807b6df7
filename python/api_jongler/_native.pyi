"""Type stubs of the extension module ``api_jongler._native`` (use the classes of ``api_jongler``)."""

import os
from typing import Callable, Dict, List, Optional, Tuple, Union

_Path = Union[str, "os.PathLike[str]"]

__version__: str

class NoKeyAvailableError(RuntimeError):
    """No key of the connector could be claimed within the wait."""

class Task:
    def cancel(self) -> None: ...

class Jongler:
    def __init__(
        self,
        connector: str,
        *,
        tor: bool = False,
        config: Optional[_Path] = None,
        db: Optional[_Path] = None,
        connectors_dir: Optional[_Path] = None,
        wait: float = 0.0,
        timeout: Optional[float] = None,
        per_connection: bool = False,
    ) -> None: ...
    @property
    def connector(self) -> str: ...
    def request(self, method: str, endpoint: str, body: str) -> Tuple[str, int]: ...
    def request_async(
        self, method: str, endpoint: str, body: str, done: Callable[[bool, object], None]
    ) -> Task: ...
    def key_states(self) -> Tuple[List[str], List[str], List[str], List[str]]: ...
    def available_keys(self) -> List[Tuple[str, str]]: ...
    def disconnect(self) -> None: ...

class MockUpstream:
    """Test support: the project's loopback mock of Gemini."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        quota: Optional[int] = None,
        window: float = 60.0,
        bad_keys: List[str] = ...,
    ) -> None: ...
    @property
    def port(self) -> int: ...
    @property
    def requests(self) -> int: ...
    def stats(self) -> Dict[str, Dict[str, int]]: ...

def cleanup(connector: Optional[str] = None, *, db: Optional[_Path] = None) -> int: ...
def reset_logging() -> None: ...
def bench_library(jongler: Jongler, method: str, endpoint: str, body: str, count: int) -> List[float]: ...
