"""A bug is one request's error: an unexpected exception while a worker admits one request fails
that request alone (INTERNAL with Kiln's metadata, an EngineError to the caller); the requests
admitted with it and the ones after it succeed on the same worker, which stays in rotation."""

from __future__ import annotations

import asyncio

import pytest

from engine.client.pool import WorkerPool
from engine.errors import EngineError
from engine.request import ImageRequest
from tests._workers import start_workers

FAULT = "this prompt trips the injected fault"


def request(prompt: str, seed: int) -> ImageRequest:
    return ImageRequest(model="sd1", prompt=prompt, width=64, height=64, seed=seed, steps=4)


@pytest.fixture
def faulty_worker(tiny_package, monkeypatch):
    monkeypatch.setenv("KILN_FAULT_PROMPT", FAULT)  # read by engine/worker/faults.py in the worker
    workers = start_workers(tiny_package("sd1"))
    yield workers
    workers.stop()


def test_a_fault_in_one_request_fails_it_alone_and_the_worker_stays_in_rotation(faulty_worker):
    (address,) = faulty_worker.addresses

    async def run():
        async with WorkerPool([address]) as pool:
            batch = [request("a blue square", 1), request(FAULT, 2), request("a red circle", 3), request("two stars", 4)]
            outcomes = await asyncio.gather(*(pool.generate(r, timeout=60) for r in batch), return_exceptions=True)
            after = await pool.generate(request("a green triangle", 5), timeout=60)
            return outcomes, after, pool.status()[0]

    outcomes, after, status = asyncio.run(run())
    good = [o for i, o in enumerate(outcomes) if i != 1]
    assert isinstance(outcomes[1], EngineError) and "injected fault" in str(outcomes[1])
    assert all(not isinstance(o, BaseException) and o.images_png for o in good), outcomes
    assert after.images_png and after.worker == address
    assert status.up and status.failures == 0, "a bug in one request is not a dead worker"
    assert faulty_worker.processes[0].poll() is None and faulty_worker.restarts == [0]
