"""The seed's ``api_jongler.APIJongler`` on apijongler's Rust core.

Code written for the Python package ``api-jongler`` runs unchanged: the same class, method names,
argument orders, return shapes and exceptions. Underneath, keys are rows of one SQLite database shared
by every process (Python or the ``apijongler`` command), claimed atomically, given back when a process
dies. Differences that stay on purpose are in the README's migration table: no secret is ever returned
(``getAvailableKeys()`` maps names to fingerprints), and states the seed never wrote (error) are real.

Besides the seed's camelCase names, each method has a snake_case alias, and :class:`AsyncAPIJongler`
has the same methods as coroutines for asyncio code.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from typing import Any, Dict, Optional, Set, Tuple, Union

from . import _native
from ._native import NoKeyAvailableError

__version__: str = _native.__version__
__all__ = ["APIJongler", "AsyncAPIJongler", "NoKeyAvailableError", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]
_STATES = ("vacant", "locked", "lockdown", "error")


def _body_of(data: Any) -> str:
    return json.dumps(data) if data is not None else ""


def _parsed(text: str, status: int) -> Any:
    """The seed's ``requestJSON`` answer: the parsed body whatever the status, else text and status."""
    try:
        return json.loads(text)
    except ValueError:
        return {"text": text, "status_code": status}


def _json_arguments(method: Any, data: Any) -> Tuple[str, Any]:
    """``requestJSON(endpoint, method, data)`` and the README's ``requestJSON(endpoint, data)``."""
    if isinstance(method, str):
        return method, data
    if data is not None:
        raise TypeError("requestJSON(endpoint, method, data): method must be a string such as 'POST'")
    return "POST", method


class APIJongler:
    """A connection to one API through the shared key pool (the seed's class).

    ``api_connector_name`` is a shipped connector (``generativelanguage.googleapis.com``,
    ``api-inference.huggingface.co``, ``router.huggingface.co``, ``httpbin.org``) or one defined by a JSON
    file in the directory named by ``APIJONGLER_CONNECTORS``. Keys come from the INI file named by
    ``APIJONGLER_CONFIG`` (or ``config``); the database is ``APIJONGLER_DB`` (or ``db``), else the
    per-user state directory.

    Keyword-only options, none of which the seed had: ``wait`` (seconds a request may wait for a key
    when every key is held or in lockdown; default 0: fail at once, as the seed did), ``timeout``
    (seconds per attempt), ``per_connection`` (hold one key from construction to :meth:`disconnect`, the
    seed's model; default: a key per request).

    Thread-safe. Create it in the process that uses it: an instance created before a ``fork()`` raises
    ``RuntimeError`` in the child (create one there instead).
    """

    def __init__(
        self,
        api_connector_name: str,
        is_tor_enabled: Optional[bool] = False,
        *,
        config: Optional[PathLike] = None,
        db: Optional[PathLike] = None,
        connectors_dir: Optional[PathLike] = None,
        wait: float = 0.0,
        timeout: Optional[float] = None,
        per_connection: bool = False,
    ) -> None:
        _native.reset_logging()
        self._is_tor_enabled = bool(is_tor_enabled)
        self._native = _native.Jongler(
            api_connector_name,
            tor=self._is_tor_enabled,
            config=config,
            db=db,
            connectors_dir=connectors_dir,
            wait=wait,
            timeout=timeout,
            per_connection=per_connection,
        )

    def __repr__(self) -> str:
        return f"APIJongler({self._native.connector!r})"

    def __enter__(self) -> "APIJongler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()

    @property
    def ApiConnectorName(self) -> str:
        """The connector's name."""
        return self._native.connector

    @property
    def IsTorEnabled(self) -> bool:
        """Whether requests go through Tor."""
        return self._is_tor_enabled

    def request(self, method: str, endpoint: str, request: str) -> Tuple[str, int]:
        """Sends ``request`` (a string; ``""``: no body) to ``endpoint``; returns ``(text, status)``
        whatever the status. Raises ``RuntimeError`` when no key is free (``NoKeyAvailableError``) or no
        answer came."""
        return self._native.request(method, endpoint, request)

    def requestJSON(self, endpoint: str, method: Any = "POST", data: Any = None) -> Any:
        """Sends ``data`` as JSON; returns the parsed answer whatever its status (an error body comes
        back as its dict, as in the seed), or ``{"text": ..., "status_code": ...}`` if it is not JSON.
        ``requestJSON(endpoint, data)`` works too."""
        method, data = _json_arguments(method, data)
        return _parsed(*self.request(method, endpoint, _body_of(data)))

    def getKeyStates(self) -> Dict[str, Set[str]]:
        """Key names by state: ``vacant``, ``locked``, ``lockdown``, ``error``."""
        return dict(zip(_STATES, map(set, self._native.key_states())))

    def getVacantKeys(self) -> Set[str]:
        """Names of the keys free now."""
        return self.getKeyStates()["vacant"]

    def getLockedKeys(self) -> Set[str]:
        """Names of the keys some process holds."""
        return self.getKeyStates()["locked"]

    def getLockdownKeys(self) -> Set[str]:
        """Names of the keys rate-limited (for every model) until their lockdown ends."""
        return self.getKeyStates()["lockdown"]

    def getErrorKeys(self) -> Set[str]:
        """Names of the keys in error (invalid, revoked) until a cleanup."""
        return self.getKeyStates()["error"]

    def getAvailableKeys(self) -> Dict[str, str]:
        """The keys that could be claimed now: name -> fingerprint. Never the secrets (the seed's did)."""
        return dict(self._native.available_keys())

    def disconnect(self) -> None:
        """Gives back the key held per connection, if any (later requests claim again)."""
        self._native.disconnect()

    def refreshConnection(self) -> None:
        """The seed's reconnect: gives back the key held per connection; the next request claims one."""
        self.disconnect()

    @staticmethod
    def cleanUp(api_connector: Optional[str] = None, *, db: Optional[PathLike] = None) -> int:
        """That connector's (or every connector's) lockdown and error keys back to vacant, dead
        processes' locks freed; keys of running processes stay theirs. Returns how many changed."""
        return _native.cleanup(api_connector, db=db)

    def run(self, method: str, endpoint: str, request: str) -> Tuple[str, int]:
        """Deprecated alias of :meth:`request` (as in the seed)."""
        warnings.warn("run() is deprecated, use request()", DeprecationWarning, stacklevel=2)
        return self.request(method, endpoint, request)

    def makeRequest(self, endpoint: str, method: Any = "POST", data: Any = None) -> Any:
        """Deprecated alias of :meth:`requestJSON` (as in the seed)."""
        warnings.warn("makeRequest() is deprecated, use requestJSON()", DeprecationWarning, stacklevel=2)
        return self.requestJSON(endpoint, method, data)

    # snake_case aliases
    request_json = requestJSON
    get_key_states = getKeyStates
    get_vacant_keys = getVacantKeys
    get_locked_keys = getLockedKeys
    get_lockdown_keys = getLockdownKeys
    get_error_keys = getErrorKeys
    get_available_keys = getAvailableKeys
    refresh_connection = refreshConnection
    clean_up = cleanUp
    cleanup = cleanUp


def _settle(future: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class AsyncAPIJongler:
    """:class:`APIJongler` for asyncio: the same constructor and methods, as coroutines.

    A request runs on apijongler's own threads and wakes the event loop when it is done; cancelling
    the awaiting task drops the request, which gives its key back. The monitoring calls (database
    reads) run in the default executor.
    """

    def __init__(self, api_connector_name: str, is_tor_enabled: Optional[bool] = False, **options: Any) -> None:
        self._sync = APIJongler(api_connector_name, is_tor_enabled, **options)

    def __repr__(self) -> str:
        return f"AsyncAPIJongler({self._sync.ApiConnectorName!r})"

    async def __aenter__(self) -> "AsyncAPIJongler":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.disconnect()

    @property
    def ApiConnectorName(self) -> str:
        """The connector's name."""
        return self._sync.ApiConnectorName

    async def request(self, method: str, endpoint: str, request: str) -> Tuple[str, int]:
        """See :meth:`APIJongler.request`."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(ok: bool, value: Any) -> None:
            loop.call_soon_threadsafe(_settle, future, ok, value)

        task = self._sync._native.request_async(method, endpoint, request, done)
        try:
            return await future
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def requestJSON(self, endpoint: str, method: Any = "POST", data: Any = None) -> Any:
        """See :meth:`APIJongler.requestJSON`."""
        method, data = _json_arguments(method, data)
        return _parsed(*await self.request(method, endpoint, _body_of(data)))

    async def getKeyStates(self) -> Dict[str, Set[str]]:
        """See :meth:`APIJongler.getKeyStates`."""
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.getKeyStates)

    async def getVacantKeys(self) -> Set[str]:
        """See :meth:`APIJongler.getVacantKeys`."""
        return (await self.getKeyStates())["vacant"]

    async def getLockedKeys(self) -> Set[str]:
        """See :meth:`APIJongler.getLockedKeys`."""
        return (await self.getKeyStates())["locked"]

    async def getLockdownKeys(self) -> Set[str]:
        """See :meth:`APIJongler.getLockdownKeys`."""
        return (await self.getKeyStates())["lockdown"]

    async def getErrorKeys(self) -> Set[str]:
        """See :meth:`APIJongler.getErrorKeys`."""
        return (await self.getKeyStates())["error"]

    async def getAvailableKeys(self) -> Dict[str, str]:
        """See :meth:`APIJongler.getAvailableKeys`."""
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.getAvailableKeys)

    async def disconnect(self) -> None:
        """See :meth:`APIJongler.disconnect`."""
        await asyncio.get_running_loop().run_in_executor(None, self._sync.disconnect)

    @staticmethod
    def cleanUp(api_connector: Optional[str] = None, *, db: Optional[PathLike] = None) -> int:
        """See :meth:`APIJongler.cleanUp` (a quick database write; not a coroutine)."""
        return APIJongler.cleanUp(api_connector, db=db)

    request_json = requestJSON
    get_key_states = getKeyStates
    get_vacant_keys = getVacantKeys
    get_locked_keys = getLockedKeys
    get_lockdown_keys = getLockdownKeys
    get_error_keys = getErrorKeys
    get_available_keys = getAvailableKeys
    clean_up = cleanUp
    cleanup = cleanUp
