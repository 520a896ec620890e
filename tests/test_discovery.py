"""Workers found by DNS (`dns:///name:port`): the pool follows what the name resolves to.

Two real workers on loopback; a stand-in resolver decides what the name resolves to, so that a test
can make workers join and leave at will (tests/test_multihost.py does the same through the
operating system's resolver, across network namespaces).
"""

from __future__ import annotations

import asyncio

import pytest

from engine.client.discovery import DnsDiscovery, DnsName, NameNotFound, parse_target, resolve
from engine.client.pool import WorkerPool
from engine.client.types import ImageRequest
from engine.errors import WorkerAuthError, WorkerUnavailableError
from server.config import ConfigError, parse_config
from server.main import remote_endpoints
from tests._workers import arun, start_workers, wait_for

TOKEN = "discovery-test-token-0123456789"
NAME = "dns:///kiln-worker:50051"


@pytest.fixture(scope="module")
def workers(tiny_package, tmp_path_factory):
    workers = start_workers(tiny_package("sd1"), count=2, log_dir=tmp_path_factory.mktemp("logs"), restart=False, token=TOKEN)
    yield workers
    workers.stop()


class Names:
    """A resolver whose answers the test sets: `answer` is a list of addresses or an exception."""

    def __init__(self, answer):
        self.answer = answer
        self.lookups = 0

    async def __call__(self, name: DnsName) -> list[str]:
        self.lookups += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)


def params(seed: int, steps: int = 2, size: int = 64) -> ImageRequest:
    return ImageRequest(model="sd1", prompt="a red circle", width=size, height=size, seed=seed, steps=steps)


def test_a_dns_target_names_a_host_and_port():
    assert parse_target("dns:///kiln-worker.kiln.svc.cluster.local:9000") == DnsName("kiln-worker.kiln.svc.cluster.local", 9000)
    for bad in ("dns:///kiln-worker", "dns://kiln-worker:9000", "dns:///:9000", "dns:///a b:9000", "dns:///w:70000"):
        with pytest.raises(ValueError, match="dns:///name:port"):
            parse_target(bad)


def test_the_operating_systems_resolver_answers():
    """getaddrinfo: /etc/hosts applies (what the network-namespace test relies on)."""
    addresses = arun(resolve(DnsName("localhost", 50051)))
    assert "127.0.0.1:50051" in addresses or "[::1]:50051" in addresses


def test_requests_wait_for_the_first_lookup_and_use_every_address(workers):
    async def run():
        names = Names(workers.addresses)
        async with WorkerPool([], discovery=DnsDiscovery([NAME], token=TOKEN, resolver=names)) as pool:
            results = await asyncio.gather(*(pool.generate(params(seed, steps=8), timeout=60) for seed in range(6)))
            return {r.worker for r in results}, sorted(pool.addresses)

    used, pooled = arun(run())
    assert used == set(workers.addresses), "the token applies to discovered workers, and both get work"
    assert pooled == sorted(workers.addresses)


def test_workers_join_and_leave_as_the_name_resolves(workers):
    a, b = workers.addresses

    async def run():
        names = Names([a])
        discovery = DnsDiscovery([NAME], token=TOKEN, resolver=names, interval=0.1)
        async with WorkerPool([], discovery=discovery) as pool:
            first = {(await pool.generate(params(seed), timeout=60)).worker for seed in range(3)}
            names.answer = [a, b]
            joined = await asyncio.to_thread(wait_for, lambda: b in pool.addresses, 10)
            both = {r.worker for r in await asyncio.gather(*(pool.generate(params(s, steps=8), timeout=60) for s in range(6)))}
            names.answer = [b]
            left = await asyncio.to_thread(wait_for, lambda: pool.addresses == [b], 10)
            last = {(await pool.generate(params(seed), timeout=60)).worker for seed in range(3)}
            return first, joined, both, left, last

    first, joined, both, left, last = arun(run())
    assert first == {a}
    assert joined and both == {a, b}, "a worker that joins gets traffic"
    assert left and last == {b}, "a worker that leaves gets none"


def test_a_worker_that_leaves_finishes_its_requests_in_flight(workers):
    a, b = workers.addresses

    async def run():
        names = Names([a])
        discovery = DnsDiscovery([NAME], token=TOKEN, resolver=names, interval=60)
        async with WorkerPool([], discovery=discovery) as pool:
            started = asyncio.Event()
            long = asyncio.create_task(pool.generate(params(1, steps=60, size=128), on_progress=lambda _: started.set()))
            await started.wait()
            names.answer = [b]
            await discovery.refresh()
            gone = a not in pool.addresses
            other = await pool.generate(params(2), timeout=60)
            return gone, await long, other, pool.status()

    gone, long, other, status = arun(run())
    assert gone
    assert long.worker == a and long.images_png, "the request in flight finished on the worker that left"
    assert other.worker == b
    assert [w.address for w in status] == [b]


def test_a_failed_lookup_keeps_the_workers_and_a_missing_name_has_none(workers):
    a, _ = workers.addresses

    async def run():
        names = Names([a])
        discovery = DnsDiscovery([NAME], token=TOKEN, resolver=names, interval=60)
        async with WorkerPool([], discovery=discovery) as pool:
            await pool.generate(params(1), timeout=60)
            names.answer = OSError("Temporary failure in name resolution")
            await discovery.refresh()
            kept = list(pool.addresses)
            served = (await pool.generate(params(2), timeout=60)).worker
            names.answer = NameNotFound("Name or service not known")
            await discovery.refresh()
            with pytest.raises(WorkerUnavailableError) as none:
                await pool.generate(params(3), timeout=60)
            return kept, served, pool.addresses, str(none.value)

    kept, served, after, message = arun(run())
    assert kept == [a] and served == a, "a DNS hiccup does not empty the pool"
    assert after == []
    assert "dns:///kiln-worker:50051 -> no addresses" in message and "no such name" in message


def test_a_failed_worker_makes_the_name_resolve_again(workers):
    a, _ = workers.addresses

    async def run():
        names = Names(["127.0.0.1:1", a])  # a stale address: nothing listens there
        discovery = DnsDiscovery([NAME], token=TOKEN, resolver=names, interval=60, min_gap=0)
        async with WorkerPool([], discovery=discovery, probe_interval=30) as pool:
            await pool.ready()  # the first lookup has listed both
            names.answer = [a]  # the next lookup no longer lists the dead one
            results = await asyncio.gather(*(pool.generate(params(seed), timeout=60) for seed in range(4)))
            dropped = await asyncio.to_thread(wait_for, lambda: pool.addresses == [a], 10)
            return {r.worker for r in results}, dropped, names.lookups

    used, dropped, lookups = arun(run())
    assert used == {a}, "requests to the dead address were retried on the live one"
    assert dropped and lookups >= 2, "the failure, not the 60 s interval, triggered the lookup"


def test_discovered_workers_without_the_token_are_refused(workers):
    async def run():
        names = Names(workers.addresses)
        async with WorkerPool([], discovery=DnsDiscovery([NAME], resolver=names)) as pool:
            with pytest.raises(WorkerAuthError):
                await pool.generate(params(1), timeout=60)

    arun(run())


def test_config_accepts_dns_targets_and_the_front_end_hands_them_to_a_discovery(tiny_package):
    raw = {
        "models": [{"name": "sd1", "package": str(tiny_package("sd1"))}],
        "workers": {"local": 0, "remote": ["10.0.0.7:50051", "dns:///kiln-worker.kiln.svc:9000"], "token": TOKEN},
    }
    endpoints, discovery = remote_endpoints(parse_config(raw, env={}))
    assert [e.address for e in endpoints] == ["10.0.0.7:50051"]
    assert "dns:///kiln-worker.kiln.svc:9000" in repr(discovery) and TOKEN not in repr(discovery)
    with pytest.raises(ConfigError, match="dns:///name:port"):
        parse_config({**raw, "workers": {"local": 0, "remote": ["dns:///kiln-worker"]}}, env={})
