"""A bounded least-recently-used cache of one component's sessions, one per fixed-shape key,
whose new entries can be built in a background thread.

Why bounded: a session specialised to one resolution keeps its own optimised graph, kernels and
memory plan on top of the shared weights (SD 1.5: about 250 MB a size, README "Memory"), and
sizes are the client's choice, so a cache that only grows ends with the worker killed.

Why in the background: creating an SD-sized session takes seconds. Built on the scheduler
thread, it would stall every other request's steps; built here, only the request that needs it
waits (engine/worker/scheduler.py keeps it out of the batch until `start_build`'s future is done).

The policy, per component:
  - at most `capacity` unpinned entries, counting builds in flight (None: no bound);
  - pinned entries (the worker's warm-up sizes) are never evicted and are not counted;
  - an entry with holders is never evicted: a call running on it holds it for the call (`use`),
    and the scheduler holds the sizes of the requests it has admitted (`hold`) until they leave;
  - room for a new key is made by evicting the least recently used idle unpinned entry. When
    every counted entry is held, `start_build` answers None (the caller waits for a release),
    while a synchronous `use` builds anyway and the cache trims back to `capacity` as holds end.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

from engine.errors import EngineError

log = logging.getLogger(__name__)

S = TypeVar("S")
# A session's fixed dimensions, sorted by name (() = dynamic shapes), then its LoRA variant's
# ("lora:NAME", scale) entries (engine/sessions.py).
Key = tuple[tuple[str, int | float], ...]


def key_of(dims: dict[str, int] | None) -> Key:
    return tuple(sorted((name, int(value)) for name, value in (dims or {}).items()))


def describe(key: Key) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in key) or "dynamic shapes"


@dataclass(frozen=True)
class CacheStats:
    cached: int  # sessions held by the cache, pinned included
    pinned: int
    building: int  # builds in flight
    builds: int  # sessions built so far (warm-up included)
    build_failures: int
    evictions: int


class _Entry(Generic[S]):
    __slots__ = ("session", "holders", "pinned")

    def __init__(self, session: S):
        self.session = session
        self.holders = 0  # running calls + admitted requests using this entry
        self.pinned = False


class Lease:
    """A hold on one cached session: it is not evicted until `release` (which may be called twice)."""

    def __init__(self, cache: "SessionCache", key: Key):
        self.cache = cache
        self.key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.cache._release(self.key)


class SessionCache(Generic[S]):
    def __init__(self, name: str, build: Callable[[Key], S], capacity: int | None, builder: Executor | None = None):
        """`build(key)` makes a session (raises on failure); `builder` runs `start_build`'s builds."""
        if capacity is not None and capacity < 1:
            raise ValueError(f"a session cache needs room for at least 1 session, got capacity {capacity}")
        self.name = name
        self.capacity = capacity
        self._build = build
        self._builder = builder
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, _Entry[S]] = OrderedDict()  # least recently used first
        self._building: dict[Key, Future] = {}
        self._counts = {"builds": 0, "build_failures": 0, "evictions": 0}
        self._overfull_logged = False

    # ---- the running path ----------------------------------------------------------------

    @contextmanager
    def use(self, key: Key) -> Iterator[S]:
        """The session for `key`, held for the duration of the `with`: built here (or awaited, if
        a background build of it is in flight) when missing."""
        entry = self._acquire(key)
        try:
            yield entry.session
        finally:
            self._release(key)

    def _acquire(self, key: Key) -> _Entry[S]:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.holders += 1
                    self._entries.move_to_end(key)
                    return entry
                pending = self._building.get(key)
                if pending is None:  # build it here, on the caller's thread
                    evicted = self._make_room(force=True)
                    pending = Future()
                    self._building[key] = pending
                    owner = True
                else:
                    owner = False
            if owner:
                _let_go(evicted)
                entry = self._run_build(key, pending, held=True)
                if entry is None:
                    pending.result()  # raises the build's error
                return entry
            pending.result()  # a background build: raises its error, or the entry is cached now
            # Loop to take the entry under the lock (another key's build may have evicted it since).

    # ---- the scheduler's path ------------------------------------------------------------

    def hold(self, key: Key, pinned_only: bool = False) -> Lease | None:
        """Hold `key`'s session if it is cached (the caller admits a request that will use it).
        `pinned_only`: only if it is pinned (holding a pinned entry never keeps room from a build)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (pinned_only and not entry.pinned):
                return None
            entry.holders += 1
            self._entries.move_to_end(key)
            return Lease(self, key)

    def pending(self, key: Key) -> Future | None:
        """The build of `key` in flight, if any."""
        with self._lock:
            return self._building.get(key)

    def start_build(self, key: Key, on_done: Callable[[Future], None] | None = None) -> Future | None:
        """Build `key` on the builder thread; the future is done once the session is cached (or
        holds the error). None when there is no room: every counted entry is held or building."""
        evicted: list[S] = []
        with self._lock:
            future = self._building.get(key)
            if key in self._entries:
                future = Future()
                future.set_result(None)
            elif future is None:
                if self._builder is None:
                    raise RuntimeError(f"{self.name}: this session cache has no builder thread")
                room = self._make_room(force=False)
                if room is None:
                    return None
                evicted = room
                future = Future()
                self._building[key] = future
                self._builder.submit(self._run_build, key, future)
        _let_go(evicted)
        if on_done is not None:
            future.add_done_callback(on_done)
        return future

    # ---- warm-up sizes -------------------------------------------------------------------

    def pin(self, key: Key) -> None:
        """Keep `key`'s session for good (built now if missing); it no longer counts against capacity."""
        with self.use(key):
            with self._lock:
                self._entries[key].pinned = True
                evicted = self._trim()
        _let_go(evicted)

    # ---- what is there -------------------------------------------------------------------

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                cached=len(self._entries),
                pinned=sum(e.pinned for e in self._entries.values()),
                building=len(self._building),
                **self._counts,
            )

    # ---- internals (the lock is held where a name says so) -------------------------------

    def _run_build(self, key: Key, future: Future, held: bool = False) -> _Entry[S] | None:
        """Build `key` and cache it (held once for the caller with `held`), then complete `future`:
        a done future means a cached entry, or the error. Returns the entry (None on failure)."""
        try:
            session = self._build(key)
        except BaseException as e:
            with self._lock:
                self._building.pop(key, None)
                self._counts["build_failures"] += 1
            log.warning("%s: building the session for %s failed: %s", self.name, describe(key), e)
            if not isinstance(e, EngineError):
                e = EngineError(f"could not build the {self.name} session for {describe(key)}: {e}")
            future.set_exception(e)
            return None
        entry = _Entry(session)
        entry.holders = int(held)
        with self._lock:
            self._building.pop(key, None)
            self._counts["builds"] += 1
            self._entries[key] = entry  # most recently used: its requester is about to hold it
        log.debug("%s: built the session for %s", self.name, describe(key))
        future.set_result(None)
        return entry

    def _release(self, key: Key) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # cannot happen: a held entry is never evicted
                log.error("%s: released %s, which is not cached", self.name, describe(key))
                return
            entry.holders -= 1
            evicted = self._trim() if entry.holders == 0 else []
        _let_go(evicted)

    def _counted(self) -> int:  # lock held
        return sum(not e.pinned for e in self._entries.values()) + len(self._building)

    def _idle(self) -> list[Key]:  # lock held; least recently used first
        return [k for k, e in self._entries.items() if not e.pinned and e.holders == 0]

    def _make_room(self, force: bool) -> list[S] | None:
        """Evict idle entries until one more key fits (lock held). Without room: None, or with
        `force` nothing evicted beyond what is idle (the cache runs over until `_trim`)."""
        if self.capacity is None:
            return []
        excess = self._counted() + 1 - self.capacity
        idle = self._idle()
        if excess > len(idle) and not force:
            return None
        if excess > len(idle) and not self._overfull_logged:
            self._overfull_logged = True
            log.info("%s: all %d sessions are in use; building one more and evicting once they are free", self.name, self.capacity)
        return self._evict(idle[: max(0, excess)])

    def _trim(self) -> list[S]:  # lock held
        if self.capacity is None:
            return []
        excess = self._counted() - self.capacity
        return self._evict(self._idle()[: max(0, excess)]) if excess > 0 else []

    def _evict(self, keys: list[Key]) -> list[S]:  # lock held
        """Drop `keys` from the cache; the caller lets go of the returned sessions outside the lock."""
        sessions = [self._entries.pop(k).session for k in keys]
        self._counts["evictions"] += len(keys)
        for k in keys:
            log.debug("%s: evicted the session for %s (least recently used)", self.name, describe(k))
        return sessions


def _let_go(evicted: list | None) -> None:
    """Free evicted sessions: the list holds the cache's last references to them.

    (Asking glibc to return the freed heap with malloc_trim was measured and changed nothing:
    resident memory stays bounded without it, benchmarks/session_cache.py.)"""
    if evicted:
        evicted.clear()
