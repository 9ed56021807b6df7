"""Sandboxes for the package's tests: a keyring of fake keys, a database and connector files in a
temporary directory, the connectors pointed at the project's loopback mock (running in this process),
and the environment variables that make the seed's code find them unchanged."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import uuid
from typing import Callable, Dict, List

import pytest

from api_jongler import _native

GEMINI = "generativelanguage.googleapis.com"
HUGGING_FACE = "api-inference.huggingface.co"
# Generous: a hang is a failure, and a loaded 2-core machine is slow.
DEADLINE = 120.0


def wait_until(condition: Callable[[], bool], what: str, limit: float = DEADLINE) -> None:
    """Polls `condition` until it holds; fails naming `what` after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.01)


class Sandbox:
    """One test's keyring, database and connector files; `env` points the package at them."""

    def __init__(self, root: pathlib.Path, mock: _native.MockUpstream, keys: int) -> None:
        self.root = root
        self.mock = mock
        # Unique per sandbox: the mock is shared by the session and counts per secret.
        tag = uuid.uuid4().hex[:8]
        self.secrets: Dict[str, Dict[str, str]] = {
            connector: {f"key{i}": f"fake-secret-{tag}-{n}-{i}-do-not-use" for i in range(keys)}
            for n, connector in enumerate((GEMINI, HUGGING_FACE))
        }
        self.keyring = root / "keys.ini"
        self.keyring.write_text(
            "".join(
                f"[{connector}]\n" + "".join(f"{name} = {secret}\n" for name, secret in keys_.items())
                for connector, keys_ in self.secrets.items()
            )
        )
        self.db = root / "pool.db"
        self.connectors = root / "connectors"
        self.connectors.mkdir()
        # Files named like the shipped connectors change only the fields they give: here, the address.
        for connector in (GEMINI, HUGGING_FACE):
            fields = {"name": connector, "host": "127.0.0.1", "port": mock.port, "protocol": "http"}
            (self.connectors / f"{connector}.json").write_text(json.dumps(fields))
        self.env = {
            "APIJONGLER_CONFIG": str(self.keyring),
            "APIJONGLER_DB": str(self.db),
            "APIJONGLER_CONNECTORS": str(self.connectors),
            "HOME": str(root),
        }

    def all_secrets(self) -> List[str]:
        return [secret for keys in self.secrets.values() for secret in keys.values()]

    def environ(self) -> Dict[str, str]:
        """This process's environment without apijongler's variables, plus the sandbox's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIJONGLER_")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def python(self, code: str, **options) -> subprocess.Popen:
        """A fresh interpreter running `code` in the sandbox."""
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=self.environ(),
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **options,
        )

    def key_stats(self, connector: str = GEMINI) -> Dict[str, Dict[str, int]]:
        """The mock's counts for this sandbox's keys of `connector`, by key name."""
        seen = self.mock.stats()
        return {name: seen[secret] for name, secret in self.secrets[connector].items() if secret in seen}

    def max_in_flight(self, connector: str = GEMINI) -> int:
        return max((stats["max_in_flight"] for stats in self.key_stats(connector).values()), default=0)


@pytest.fixture(scope="session")
def mock() -> _native.MockUpstream:
    return _native.MockUpstream(latency=0.0)


@pytest.fixture(scope="session")
def slow_mock() -> _native.MockUpstream:
    """20 ms per answer: long enough for requests on one key to overlap if the pool let them."""
    return _native.MockUpstream(latency=0.02)


def _sandbox(tmp_path, mock, monkeypatch, keys: int = 4) -> Sandbox:
    for name in list(os.environ):
        if name.startswith("APIJONGLER_"):
            monkeypatch.delenv(name)
    sandbox = Sandbox(tmp_path, mock, keys)
    for name, value in sandbox.env.items():
        monkeypatch.setenv(name, value)
    return sandbox


@pytest.fixture
def sandbox(tmp_path, mock, monkeypatch) -> Sandbox:
    return _sandbox(tmp_path, mock, monkeypatch)


@pytest.fixture
def slow_sandbox(tmp_path, slow_mock, monkeypatch) -> Sandbox:
    return _sandbox(tmp_path, slow_mock, monkeypatch)


@pytest.fixture
def one_key_sandbox(tmp_path, mock, monkeypatch) -> Sandbox:
    return _sandbox(tmp_path, mock, monkeypatch, keys=1)
