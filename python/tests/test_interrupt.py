"""Ctrl-C (SIGINT) interrupts a request in flight or a wait for a key at once, with KeyboardInterrupt
raised from the call, and the key goes back while the process lives on (or stays with its holder)."""

from __future__ import annotations

import pathlib
import select
import signal

from api_jongler import APIJongler
from conftest import DEADLINE, GEMINI, wait_until

SLOW = "/slow/v1beta/models/gemini-1.5-flash:generateContent"

# The child catches the interrupt, says so, and lives on until the test closes its stdin. It restores
# Python's own SIGINT handler first: a process started in the background of a non-interactive shell (as
# CI may run the tests) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt at all.
CHILD = """
import signal, sys, traceback
signal.signal(signal.SIGINT, signal.default_int_handler)
from api_jongler import APIJongler
jongler = APIJongler({connector!r}, wait={wait})
try:
    jongler.request("POST", {endpoint!r}, "{{}}")
except KeyboardInterrupt:
    traceback.print_exc()
    print("interrupted", flush=True)
    sys.stdin.readline()
    sys.exit(3)
"""


def child(sandbox, endpoint: str, wait: float):
    import subprocess

    return sandbox.python(CHILD.format(connector=GEMINI, endpoint=endpoint, wait=wait), stdin=subprocess.PIPE)


def thread_names(pid: int) -> set:
    names = set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            names.add((task / "comm").read_text().strip())
        except OSError:
            pass
    return names


def interrupt(process) -> None:
    process.send_signal(signal.SIGINT)
    # The slow answer would come after 60 s, a waiter's key after 600 s: the word before either is the
    # interruption's.
    ready, _, _ = select.select([process.stdout], [], [], 55)
    assert ready and process.stdout.readline().strip() == "interrupted"


def finish(process) -> str:
    out, err = process.communicate("\n", timeout=DEADLINE)
    assert process.returncode == 3, f"{out}\n{err}"
    # Raised inside the call, not before it: the innermost frame is the package's native call.
    assert "self._native.request(" in err and "KeyboardInterrupt" in err, err
    return err


def test_ctrl_c_interrupts_a_request_and_gives_the_key_back(sandbox):
    process = child(sandbox, SLOW, 0)
    wait_until(lambda: any(s["in_flight"] for s in sandbox.key_stats().values()), "the request in flight")
    assert len(APIJongler(GEMINI).getLockedKeys()) == 1
    interrupt(process)
    # The child is alive: the key comes back because the call gave it back, not because its holder died.
    wait_until(lambda: not APIJongler(GEMINI).getLockedKeys(), "the key to come back")
    wait_until(lambda: not any(s["in_flight"] for s in sandbox.key_stats().values()), "the mock to see the client go")
    finish(process)


def test_ctrl_c_interrupts_a_wait_for_a_key(one_key_sandbox):
    holder = APIJongler(GEMINI, per_connection=True)
    process = child(one_key_sandbox, "/x", 600)
    # The coordinator starts its waiters' watcher thread when the first waiter queues.
    wait_until(lambda: "apijongler-wait" in thread_names(process.pid), "the child to wait for a key")
    interrupt(process)
    assert holder.getLockedKeys() == {"key0"}
    finish(process)
    holder.disconnect()
    assert APIJongler(GEMINI).getVacantKeys() == {"key0"}
