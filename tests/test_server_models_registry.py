"""The model registry against real workers: one refresh for many misses, periodic refresh, and the
models of a worker that is down kept while the pool probes it back."""

from __future__ import annotations

import asyncio
import signal

import pytest

from engine.client.pool import WorkerPool
from engine.client.types import ImageRequest
from engine.errors import WorkerUnavailableError
from server.config import parse_config
from server.models_registry import ModelRegistry
from tests._workers import arun, await_until, start_workers


@pytest.fixture(scope="module")
def two_models(tiny_package, tmp_path_factory):
    """Worker 0 serves sd1, worker 1 serves sd2v."""
    logs = tmp_path_factory.mktemp("logs")
    first = start_workers(tiny_package("sd1"), log_dir=logs / "sd1", restart=False)
    second = start_workers(tiny_package("sd2v"), log_dir=logs / "sd2v", restart=False)
    yield first, second
    first.stop()
    second.stop()


def params(seed: int, model: str = "sd1") -> ImageRequest:
    return ImageRequest(model=model, prompt="a blue triangle", width=64, height=64, seed=seed, steps=4)


def config_for(addresses: list[str]):
    models = [{"name": "sd1"}, {"name": "sd2v"}, {"name": "ghost"}]  # no worker serves "ghost"
    return parse_config({"models": models, "workers": {"local": 0, "remote": addresses}}, env={})


def test_concurrent_misses_share_one_refresh_and_a_miss_is_remembered(two_models):
    addresses = [w.addresses[0] for w in two_models]

    async def run():
        async with WorkerPool(addresses) as pool:
            registry = ModelRegistry(config_for(addresses), pool, negative_ttl_s=3600)
            first = await asyncio.gather(*(registry.resolve("ghost") for _ in range(20)), return_exceptions=True)
            after_burst = registry.refreshes
            again = await asyncio.gather(*(registry.resolve("ghost") for _ in range(20)), return_exceptions=True)
            served = await registry.resolve("sd2v")
            registry.negative_ttl_s = 0.0
            with pytest.raises(WorkerUnavailableError):
                await registry.resolve("ghost")
            return first + again, after_burst, served, registry.refreshes

    errors, after_burst, served, refreshes = arun(run())
    assert all(isinstance(e, WorkerUnavailableError) and "ghost" in str(e) for e in errors)
    assert after_burst == 1  # twenty concurrent misses, one round of RPCs
    assert served.limits.name == "sd2v" and served.limits.family == "sd2"
    assert refreshes == 2  # the remembered miss asked nobody until its time was up


def test_the_registry_refreshes_periodically(two_models):
    addresses = [w.addresses[0] for w in two_models]

    async def run():
        async with WorkerPool(addresses) as pool:
            registry = ModelRegistry(config_for(addresses), pool)
            registry.refresh_interval_s = 0.01
            task = asyncio.create_task(registry.refresh_forever())
            try:
                assert await await_until(lambda: registry.refreshes >= 3, 30)
            finally:
                task.cancel()
            return await registry.resolve("sd1")

    assert arun(run()).limits.name == "sd1"


def test_requests_go_only_to_workers_that_serve_their_model(two_models):
    first, second = two_models
    addresses = [first.addresses[0], second.addresses[0]]

    async def run():
        async with WorkerPool(addresses) as pool:
            await ModelRegistry(config_for(addresses), pool).refresh()  # the workers list their models
            return await asyncio.gather(*(pool.generate(params(seed, model)) for seed in range(4) for model in ("sd1", "sd2v")))

    results = arun(run())
    assert [r.worker for r in results] == [first.addresses[0], second.addresses[0]] * 4


def test_a_down_workers_models_are_kept_while_it_is_probed(two_models, tiny_package, tmp_path):
    first = two_models[0]
    second = start_workers(tiny_package("sd2v"), log_dir=tmp_path, restart=False)  # its own: it is killed
    addresses = [first.addresses[0], second.addresses[0]]

    async def run():
        async with WorkerPool(addresses, probe_interval=3600) as pool:
            registry = ModelRegistry(config_for(addresses), pool, negative_ttl_s=0.0)
            await registry.refresh()
            second.processes[0].send_signal(signal.SIGKILL)
            second.processes[0].wait()
            # Its model's request finds it dead, marks it down, and has nowhere else to go: a 503,
            # not the sd1 worker's 404.
            with pytest.raises(WorkerUnavailableError, match="sd2v"):
                await pool.generate(params(3, "sd2v"), timeout=60)
            down = [s.address for s in pool.status() if not s.up]
            await registry.refresh()
            kept = await registry.resolve("sd2v")
            return down, kept

    try:
        down, kept = arun(run())
    finally:
        second.stop()
    assert down == [second.addresses[0]]
    assert kept.limits.name == "sd2v"
