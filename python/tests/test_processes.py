"""Processes: multiprocessing with fork, spawn and forkserver after the parent used the package; and
one pool shared by Python processes and the `apijongler` command the wheel installs."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest

import workers
from api_jongler import APIJongler
from conftest import DEADLINE, GEMINI

ENDPOINT = workers.ENDPOINT


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_children_build_their_own_instance(sandbox, method):
    parent = APIJongler(GEMINI)
    assert parent.request("POST", ENDPOINT, "{}")[1] == 200  # the runtime and its threads exist now
    with multiprocessing.get_context(method).Pool(2) as pool:
        statuses = pool.map_async(workers.request_in_child, range(4)).get(timeout=DEADLINE)
    assert statuses == [200] * 4
    assert parent.request("POST", ENDPOINT, "{}")[1] == 200
    assert parent.getVacantKeys() == {"key0", "key1", "key2", "key3"}


def test_an_inherited_instance_refuses_in_a_forked_child(sandbox):
    workers.INHERITED = APIJongler(GEMINI, per_connection=True)
    try:
        held = workers.INHERITED.getLockedKeys()
        assert len(held) == 1
        with multiprocessing.get_context("fork").Pool(1) as pool:
            outcome = pool.map_async(workers.use_inherited, [0]).get(timeout=DEADLINE)[0]
        assert outcome.startswith("RuntimeError: "), outcome
        assert "forked" in outcome and "Create a new" in outcome
        # The parent's key stayed the parent's.
        assert workers.INHERITED.getLockedKeys() == held
        assert workers.INHERITED.request("POST", ENDPOINT, "{}")[1] == 200
    finally:
        workers.INHERITED.disconnect()
        workers.INHERITED = None


def test_an_instance_is_not_sent_to_spawned_children(sandbox):
    with pytest.raises(TypeError):
        multiprocessing.reduction.ForkingPickler.dumps(APIJongler(GEMINI)._native)


PYTHON_WORKER = f"""
from api_jongler import APIJongler
jongler = APIJongler({GEMINI!r}, wait=300)
for _ in range(10):
    text, status = jongler.request("POST", {ENDPOINT!r}, "{{}}")
    assert status == 200, (status, text)
"""


def the_command() -> str:
    found = shutil.which("apijongler", path=os.path.dirname(sys.executable))
    assert found, "the wheel installs the apijongler command next to the interpreter"
    return found


def test_python_and_cli_processes_share_one_pool(slow_sandbox):
    sandbox = slow_sandbox
    command = the_command()
    cli_loop = f"for i in 1 2 3 4 5; do {command} --json {GEMINI} POST {ENDPOINT} '{{}}' --wait 300s || exit 1; done"
    pythons = [sandbox.python(PYTHON_WORKER) for _ in range(8)]
    clis = [
        subprocess.Popen(["bash", "-c", cli_loop], env=sandbox.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    for process in pythons + clis:
        out, err = process.communicate(timeout=DEADLINE * 3)
        assert process.returncode == 0, f"{out}\n{err}"
        for line in out.splitlines() if process in clis else []:
            envelope = json.loads(line)
            assert set(envelope) == {"attempts", "body", "key", "status"}
            assert envelope["status"] == 200 and envelope["attempts"] == 1
            assert envelope["key"] in sandbox.secrets[GEMINI]
    stats = sandbox.key_stats()
    assert sum(s["ok"] for s in stats.values()) == 8 * 10 + 8 * 5
    assert sandbox.max_in_flight() == 1, f"a key was used by two requests at once: {stats}"
