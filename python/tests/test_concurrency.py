"""Threads and asyncio: the GIL is released while a request waits, requests from many threads or
tasks share the keys without overlap, and a cancelled asyncio request gives its key back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from api_jongler import APIJongler, AsyncAPIJongler
from conftest import GEMINI, wait_until

ENDPOINT = "/v1beta/models/gemini-1.5-flash:generateContent"
SLOW = "/slow/v1beta/models/gemini-1.5-flash:generateContent"


def test_threads_share_one_instance_without_overlap(slow_sandbox):
    jongler = APIJongler(GEMINI, wait=300)
    statuses = []

    def worker():
        for _ in range(5):
            statuses.append(jongler.request("POST", ENDPOINT, "{}")[1])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 40
    assert slow_sandbox.max_in_flight() == 1
    assert jongler.getVacantKeys() == {"key0", "key1", "key2", "key3"}


def test_the_gil_is_released_during_a_request(sandbox):
    # The slow path answers after 60 s; the attempt times out after 2 s. Meanwhile this thread, which
    # needs the GIL to poll the mock, sees the request in flight.
    jongler = APIJongler(GEMINI, timeout=2)
    outcome = []

    def slow():
        try:
            jongler.request("POST", SLOW, "{}")
        except RuntimeError as error:
            outcome.append(error)

    thread = threading.Thread(target=slow)
    thread.start()
    wait_until(lambda: any(s["in_flight"] for s in sandbox.key_stats().values()), "the request in flight")
    thread.join()
    assert outcome, "the attempt timed out"


def test_asyncio_requests_run_together_without_overlap(slow_sandbox):
    async def main():
        jongler = AsyncAPIJongler(GEMINI, wait=300)
        answers = await asyncio.gather(*(jongler.requestJSON(ENDPOINT, {"n": n}) for n in range(16)))
        states = await jongler.getKeyStates()
        return answers, states

    answers, states = asyncio.run(main())
    assert all("candidates" in answer for answer in answers)
    assert states["vacant"] == {"key0", "key1", "key2", "key3"}
    assert slow_sandbox.max_in_flight() == 1


def test_asyncio_errors_are_raised_in_the_awaiting_task(one_key_sandbox):
    async def main():
        holder = AsyncAPIJongler(GEMINI, per_connection=True)
        try:
            await AsyncAPIJongler(GEMINI).request("POST", ENDPOINT, "{}")
        finally:
            await holder.disconnect()

    with pytest.raises(RuntimeError, match="No API keys available"):
        asyncio.run(main())


def test_a_cancelled_asyncio_request_gives_its_key_back(sandbox):
    async def main():
        jongler = AsyncAPIJongler(GEMINI)
        task = asyncio.ensure_future(jongler.request("POST", SLOW, "{}"))
        while not any(s["in_flight"] for s in sandbox.key_stats().values()):
            assert not task.done()
            await asyncio.sleep(0.01)
        assert len(await jongler.getLockedKeys()) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def key_back():
            while await jongler.getLockedKeys():
                await asyncio.sleep(0.01)

        # The slow answer would free the key after 60 s: back well before that is the cancellation's doing.
        await asyncio.wait_for(key_back(), 50)
        return await jongler.getVacantKeys()

    assert asyncio.run(main()) == {"key0", "key1", "key2", "key3"}
    wait_until(lambda: not any(s["in_flight"] for s in sandbox.key_stats().values()), "the mock to see the client go")
