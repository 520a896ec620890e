"""A full admission queue refuses at once, before any work, with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import time

import grpc
import pytest

from engine.client.pool import WorkerPool
from engine.client.types import ImageRequest
from engine.errors import QueueFullError
from engine.worker import inference_pb2 as pb
from tests._workers import V2, arun, infer_request, metrics, start_workers, wait_for


@pytest.fixture(scope="module")
def worker(tiny_package, tmp_path_factory):
    # One sample per UNet call and room for two waiting images.
    workers = start_workers(tiny_package("sd1"), max_batch=1, max_queue=2, log_dir=tmp_path_factory.mktemp("logs"))
    yield workers.addresses[0]
    assert workers.stop() == [0]


def long_request(seed: int) -> pb.ModelInferRequest:
    # Long enough (150 steps at 384x384) that the queue is still full when the refused request comes:
    # at 128x128 the first one sometimes finished first on a loaded machine and freed a slot.
    return infer_request(prompt="a cat", width=384, height=384, seed=seed, steps=150)


def fill(worker: str, v2: V2) -> list:
    """One request running and two queued, in that order: sent together, the three could arrive in
    any order, and one arriving while the other two wait would itself be refused and leave a slot
    open (the pool test once got its request in that way)."""
    running = v2.ModelInferStream(long_request(1), timeout=60)
    next(running)  # its first progress message: it is in the running set
    queued = [v2.ModelInfer.future(long_request(seed), timeout=60) for seed in (2, 3)]
    assert wait_for(lambda: metrics(worker)["queue_images"] == 2)
    assert not any(call.done() for call in queued), "a queued request ended early"
    return [running, *queued]


def test_a_full_queue_refuses_at_once_with_resource_exhausted(worker):
    v2 = V2(worker)
    calls = []
    try:
        calls += fill(worker, v2)
        before = metrics(worker)

        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            v2.ModelInfer(long_request(4), timeout=60)
        refused_in = time.monotonic() - start

        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details()
        assert refused_in < 1.0
        after = metrics(worker)
        assert after["requests_rejected"] == before["requests_rejected"] + 1
        assert after["requests_received"] == before["requests_received"]  # nothing of it was queued
        assert after["text_encoder_calls"] == before["text_encoder_calls"]  # nor text-encoded
    finally:
        for call in calls:
            call.cancel()
        v2.close()
    assert wait_for(lambda: metrics(worker)["live_requests"] == 0, 10)


def test_the_pool_raises_queue_full_when_every_worker_is_full(worker):
    params = ImageRequest(model="sd1", prompt="a cat", width=128, height=128, seed=1, steps=150)
    v2 = V2(worker)
    calls = []
    try:
        calls += fill(worker, v2)

        async def refused():
            async with WorkerPool([worker]) as pool:
                with pytest.raises(QueueFullError):
                    await pool.generate(params, timeout=30)
                return pool.status()[0].up

        assert arun(refused()), "a full worker is busy, not down"
    finally:
        for call in calls:
            call.cancel()
        v2.close()
    assert wait_for(lambda: metrics(worker)["live_requests"] == 0, 10)
