"""The client pool against two real workers: routing, errors, cancellation, and kill -9 failover."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.client.local import LocalWorkers
from engine.client.pool import WorkerPool
from engine.client.types import ImageRequest
from engine.errors import InvalidRequestError, ModelNotFoundError, WorkerUnavailableError
from tests._workers import FAST, TOLERANCE, arun, max_diff, metrics, start_workers, wait_for


def two_workers(package, log_dir):
    # restart=False: the kill test restarts the worker itself, to test the pool alone
    # (tests/test_worker_supervision.py tests LocalWorkers' own restarts)
    return start_workers(package, count=2, log_dir=log_dir, restart=False)


@pytest.fixture(scope="module")
def workers(tiny_package, tmp_path_factory):
    """Two workers shared by the tests that leave them as they found them."""
    workers = two_workers(tiny_package("sd1"), tmp_path_factory.mktemp("logs"))
    yield workers
    workers.stop()


@pytest.fixture
def own_workers(tiny_package, tmp_path):
    """Two workers for one test that kills one of them, so no other test meets a dead worker."""
    workers = two_workers(tiny_package("sd1"), tmp_path / "logs")
    yield workers
    workers.stop()


def params(seed: int, steps: int = 4, size: int = 64, **kw) -> ImageRequest:
    return ImageRequest(model="sd1", prompt="a blue triangle", width=size, height=size, seed=seed, steps=steps, **kw)


def test_the_pool_is_ready_and_lists_the_models(workers):
    async def run():
        async with WorkerPool(workers.addresses) as pool:
            return await pool.ready(), await pool.models()

    ready, models = arun(run())
    assert ready
    assert [(m.name, m.family, m.max_batch) for m in models] == [("sd1", "sd1", 4)]


def test_concurrent_requests_spread_over_the_workers(workers):
    async def run():
        async with WorkerPool(workers.addresses) as pool:
            return await asyncio.gather(*(pool.generate(params(seed, steps=10), timeout=60) for seed in range(6)))

    results = arun(run())
    assert {r.worker for r in results} == set(workers.addresses)
    assert [r.seeds for r in results] == [[seed] for seed in range(6)]


def test_errors_come_back_as_engine_exceptions(workers):
    async def run():
        async with WorkerPool(workers.addresses) as pool:
            with pytest.raises(InvalidRequestError) as bad:
                await pool.generate(params(1, steps=0))
            with pytest.raises(ModelNotFoundError):
                await pool.generate(ImageRequest(model="nope", prompt="a", width=64, height=64, seed=1))
            return bad.value, pool.status()

    bad, status = arun(run())
    assert bad.param == "steps" and "steps" in str(bad)
    assert all(w.up for w in status), "a bad request does not mark a worker down"


def test_cancelling_the_awaiting_task_cancels_the_call_on_the_worker(workers):
    async def run():
        async with WorkerPool(workers.addresses[:1]) as pool:
            started = asyncio.Event()
            task = asyncio.create_task(pool.generate(params(3, steps=150, size=128), on_progress=lambda _: started.set()))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    address = workers.addresses[0]
    before = metrics(address)
    arun(run())
    assert wait_for(lambda: metrics(address)["requests_cancelled"] == before["requests_cancelled"] + 1, 10)
    assert metrics(address)["freed_steps"] - before["freed_steps"] > 100


def test_no_reachable_worker_raises_unavailable_at_once():
    async def run():
        async with WorkerPool(["127.0.0.1:1"], probe_timeout=1.0) as pool:
            start = time.monotonic()
            with pytest.raises(WorkerUnavailableError):
                await pool.generate(params(1), timeout=30)
            return time.monotonic() - start, pool.status()[0].up

    took, up = arun(run())
    assert took < 5 and not up


def test_kill_9_mid_batch_retries_on_the_other_worker_and_brings_it_back(own_workers, tiny_package):
    workers = own_workers
    victim, survivor = workers.addresses
    batch = [params(seed, steps=40, size=128) for seed in range(10, 16)]

    async def run():
        async with WorkerPool(workers.addresses, probe_interval=0.2) as pool:
            tasks = [asyncio.create_task(pool.generate(p, timeout=120)) for p in batch]
            assert await asyncio.to_thread(wait_for, lambda: metrics(victim)["running_images"] >= 2, 30)
            workers.processes[0].kill()  # SIGKILL, in the middle of a batch
            results = await asyncio.wait_for(asyncio.gather(*tasks), 90)  # never hangs
            down = not pool.status()[0].up and pool.status()[0].failures == 1

            # The same request on the survivor alone gives the same pixels as its failed-over run.
            again = await pool.generate(batch[0], timeout=60)

            # A worker on the dead one's port is taken back once it is ready.
            port = int(victim.rsplit(":", 1)[1])
            restarted = LocalWorkers([tiny_package("sd1")], ports=[port], **FAST)
            try:
                await restarted.astart(120)
                back = await asyncio.to_thread(wait_for, lambda: pool.status()[0].up, 20)
                routed = await asyncio.gather(*(pool.generate(params(seed), timeout=60) for seed in range(4)))
            finally:
                await restarted.astop()
            return results, down, again, back, routed

    results, down, again, back, routed = arun(run())
    assert [r.seeds for r in results] == [[p.seed] for p in batch]
    assert all(r.images_png for r in results)
    assert down, "the killed worker is marked down"
    assert {r.worker for r in results} == {survivor}, "the victim's requests were retried on the survivor"
    assert max_diff(results[0].images_png[0], again.images_png[0]) <= TOLERANCE
    assert back, "the restarted worker is probed and marked up"
    assert victim in {r.worker for r in routed}


def test_removing_a_worker_lets_a_probe_on_it_end_instead_of_cancelling_its_caller():
    """A probe (or a model listing) on a worker that leaves the pool meanwhile gets its answer or
    a transport error: closing the channel under it must not raise CancelledError in the caller
    (a /ready scrape or a registry refresh). The worker here answers ServerReady after a pause,
    only once the test lets it, so the removal lands while the probe is in flight."""
    import grpc

    from engine.worker import inference_pb2 as pb

    answering, answer = asyncio.Event(), asyncio.Event()

    async def slow_ready(request, context):
        answering.set()
        await answer.wait()
        return pb.ServerReadyResponse(ready=True)

    async def run():
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            slow_ready, request_deserializer=pb.ServerReadyRequest.FromString, response_serializer=pb.ServerReadyResponse.SerializeToString
        )
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ServerReady": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with WorkerPool([f"127.0.0.1:{port}"], probe_timeout=5) as pool:
                probe = asyncio.create_task(pool.ready())
                await answering.wait()
                assert pool.remove(f"127.0.0.1:{port}")
                answer.set()
                return await probe  # before: CancelledError
        finally:
            await server.stop(0)

    assert arun(run()) is True
