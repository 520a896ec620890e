"""Workers found by DNS: `dns:///name:port` stands for every address `name` resolves to.

    discovery = DnsDiscovery(["dns:///kiln-worker.kiln.svc.cluster.local:9000"], token=token)
    pool = WorkerPool([], discovery=discovery)  # the pool starts it on first use, stops it on close

A Kubernetes headless Service's name resolves to the addresses of its ready pods, so pods that
start join the pool and pods that go away leave it, without restarting the front end.

Resolution is the operating system's (getaddrinfo in a thread): /etc/hosts, nsswitch and the
cluster's DNS all apply, as they do for any other program on the host. Each name is resolved
again every `interval` seconds, and soon after a worker fails (at most once per `min_gap`
seconds), so a pod replaced after a crash is found before the next round.

What an answer changes:
- a new address becomes a worker of the pool, with this discovery's token and TLS;
- an address no longer listed leaves it (requests in flight on it finish; see WorkerPool.remove);
- a name that does not exist (EAI_NONAME: e.g. a headless Service with no ready pod) has no
  workers;
- a failed lookup of another kind (a DNS server that timed out, EAI_AGAIN) keeps the addresses
  the name had: a DNS hiccup must not empty the pool. The pool's own probing deals with those
  workers if they are really gone.

Addresses are "a.b.c.d:port" or "[v6]:port", the form gRPC and WorkerStatus use. An address also
given as a plain workers.remote entry stays the pool's own: discovery never removes what it did
not add.

Imports neither onnxruntime nor torch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import grpc

from engine.client.credentials import Endpoint

if TYPE_CHECKING:
    from engine.client.pool import WorkerPool

log = logging.getLogger(__name__)

SCHEME = "dns:///"
DEFAULT_INTERVAL_S = 5.0
DEFAULT_MIN_GAP_S = 0.5
_TARGET_RE = re.compile(r"^dns:///(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class DnsName:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{SCHEME}{self.host}:{self.port}"


def is_dns_target(target: str) -> bool:
    return target.startswith(SCHEME)


def parse_target(target: str) -> DnsName:
    """`dns:///name:port` -> DnsName; ValueError saying what a target looks like otherwise."""
    m = _TARGET_RE.match(target)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"a DNS target looks like dns:///name:port (port 1..65535), got {target!r}")
    return DnsName(m["host"], int(m["port"]))


class NameNotFound(Exception):
    """The name does not exist (an authoritative answer: it has no addresses)."""


async def resolve(name: DnsName) -> list[str]:
    """Every TCP address of `name` (sorted, each once), by the operating system's resolver.

    Raises NameNotFound when the name does not exist, OSError (socket.gaierror) for a failed lookup.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name.host, name.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise NameNotFound(str(e)) from None
        raise
    addresses = set()
    for family, _, _, _, sockaddr in infos:
        host = sockaddr[0]
        addresses.add(f"[{host}]:{sockaddr[1]}" if family == socket.AF_INET6 else f"{host}:{sockaddr[1]}")
    return sorted(addresses)


Resolver = Callable[[DnsName], Awaitable[list[str]]]


@dataclass
class _Name:
    name: DnsName
    addresses: list[str] = field(default_factory=list)
    problem: str = ""  # why the last lookup failed ("" when it answered)


class DnsDiscovery:
    """Keeps a WorkerPool's workers equal to what `targets` resolve to (see the module docstring)."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        token: str | None = None,  # the worker token for discovered workers (None: send none)
        credentials: grpc.ChannelCredentials | None = None,  # TLS to them (None: plaintext)
        interval: float = DEFAULT_INTERVAL_S,
        min_gap: float = DEFAULT_MIN_GAP_S,
        resolver: Resolver = resolve,
    ):
        if not targets:
            raise ValueError("DnsDiscovery needs at least one dns:///name:port target")
        if interval <= 0 or min_gap < 0:
            raise ValueError(f"interval must be positive and min_gap not negative, got {interval}, {min_gap}")
        self._names = [_Name(parse_target(t)) for t in dict.fromkeys(targets)]
        self._token = token
        self._credentials = credentials
        self.interval = interval
        self.min_gap = min_gap
        self._resolver = resolver
        self._pool: WorkerPool | None = None
        self._mine: set[str] = set()  # addresses this discovery added to the pool
        self._task: asyncio.Task | None = None
        self._round: asyncio.Task | None = None
        self._first: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._last_round = float("-inf")
        self.rounds = 0  # resolution rounds completed

    def __repr__(self) -> str:  # the token is a secret
        return f"DnsDiscovery({[str(n.name) for n in self._names]}, interval={self.interval:g})"

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self, pool: WorkerPool) -> None:
        """Begin resolving for `pool` (inside its event loop)."""
        if self._task is not None:
            return
        self._pool = pool
        self._first = asyncio.Event()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kiln-dns-discovery")

    async def first_round(self) -> None:
        """Until the first resolution has been applied (answered or failed)."""
        assert self._first is not None, "start() first"
        await self._first.wait()

    def nudge(self) -> None:
        """A worker failed: resolve again soon (pods are replaced under new addresses)."""
        if self._wake is not None:
            self._wake.set()

    async def refresh(self) -> None:
        """Resolve every name now and apply the answer; concurrent callers share one round."""
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._resolve_all())
        await asyncio.shield(self._round)

    def describe(self) -> list[str]:
        """One line per name, for error messages: what it resolved to, or why not."""
        lines = []
        for n in self._names:
            found = ", ".join(n.addresses) if n.addresses else "no addresses"
            lines.append(f"{n.name} -> {found}" + (f" (last lookup failed: {n.problem})" if n.problem else ""))
        return lines

    async def stop(self) -> None:
        if self._first is not None:
            self._first.set()  # whoever waits for a first round stops waiting: there will be none
        for task in (self._task, self._round):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._round = None

    async def _run(self) -> None:
        assert self._wake is not None and self._first is not None
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("resolving the worker names failed")
            self._first.set()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
                # Woken by a failure: not more often than min_gap, however many workers fail.
                await asyncio.sleep(max(0.0, self._last_round + self.min_gap - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _resolve_all(self) -> None:
        answers = await asyncio.gather(*(self._resolver(n.name) for n in self._names), return_exceptions=True)
        self._last_round = time.monotonic()
        for n, answer in zip(self._names, answers):
            if isinstance(answer, NameNotFound):
                if n.addresses or not n.problem:
                    log.warning("%s does not resolve (%s): no workers from it", n.name, answer)
                n.addresses, n.problem = [], f"no such name ({answer})"
            elif isinstance(answer, BaseException):
                if not n.problem:
                    log.warning("looking up %s failed (%s): keeping its %d worker(s)", n.name, answer, len(n.addresses))
                n.problem = f"{type(answer).__name__}: {answer}"
            else:
                if n.problem:
                    log.info("%s resolves again", n.name)
                n.addresses, n.problem = answer, ""
        self._apply()
        self.rounds += 1

    def _apply(self) -> None:
        pool = self._pool
        assert pool is not None
        wanted = {a: n.name for n in self._names for a in n.addresses}
        for address, name in wanted.items():
            endpoint = Endpoint(
                address,
                token=self._token,
                credentials=self._credentials,
                tls_server_name=name.host if self._credentials is not None else None,
            )
            if address not in self._mine and pool.add(endpoint):
                self._mine.add(address)
                log.info("worker %s joined (%s)", address, name)
        for address in sorted(self._mine - wanted.keys()):
            self._mine.discard(address)
            if pool.remove(address):
                log.info("worker %s left (no longer in DNS)", address)


__all__ = ["DnsDiscovery", "DnsName", "NameNotFound", "SCHEME", "is_dns_target", "parse_target", "resolve"]
