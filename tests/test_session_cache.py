"""The bounded session cache (engine/session_cache.py) and how the scheduler builds new sizes off
its thread, on real onnxruntime sessions of the tiny SD 1.x package.

Concurrency is synchronised on events (a build that blocks until the test releases it, a call
that blocks inside onnxruntime's run), never on sleeps; the waits' timeouts only stop a broken
test from hanging.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from engine.errors import DeadlineExceededError, EngineError, PackageError, RequestCancelledError
from engine.pipeline import ImageRequest, Pipeline
from engine.session_cache import key_of
from engine.sessions import RuntimeOptions
from engine.worker.scheduler import Job, JobFailed, JobResult, Scheduler

GUARD_S = 60  # how long a broken test may hang before it fails


@pytest.fixture
def make_pipe(tiny_package):
    def make(max_sessions: int) -> Pipeline:
        return Pipeline(tiny_package("sd1"), RuntimeOptions(threads=1, max_sessions=max_sessions))

    return make


def draw(pipe: Pipeline, width: int, height: int = 64) -> None:
    pipe.generate([ImageRequest(prompt="a red circle", width=width, height=height, seed=0, steps=1)])


def unet_widths(pipe: Pipeline) -> list[int]:
    """The latent widths of the cached UNet sessions, least recently used first."""
    return [dict(key)["width"] for key in pipe.unet.loaded_shapes]


def decode_feeds(width: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One VAE-decoder call at 64 x `width` pixels."""
    latents = np.zeros((1, 4, 8, width // 8), np.float32)
    return {"latent_sample": latents}, {"latent_height": 8, "latent_width": width // 8}


# ---- the cache ------------------------------------------------------------------------------


def test_the_least_recently_used_size_is_evicted_first(make_pipe):
    pipe = make_pipe(max_sessions=2)
    draw(pipe, 64)
    draw(pipe, 72)
    draw(pipe, 64)  # 64 is now the most recently used
    draw(pipe, 80)
    assert unet_widths(pipe) == [8, 10], "72 (latent width 9), the least recently used, was evicted"
    assert pipe.unet.stats().evictions == 1


def test_the_bound_holds_for_every_component_over_many_sizes(make_pipe):
    pipe = make_pipe(max_sessions=2)
    for width in range(64, 128, 8):  # 8 sizes
        draw(pipe, width)
        for name, stats in pipe.session_stats().items():
            assert stats.cached - stats.pinned <= 2, f"{name} holds {stats.cached} sessions"
    assert pipe.unet.stats().evictions == 6 and pipe.unet.stats().builds == 8


def test_warm_up_sizes_are_pinned_never_evicted_and_not_counted(make_pipe):
    pipe = make_pipe(max_sessions=1)
    pipe.pin_size(64, 64)
    for width in (72, 80, 88):
        draw(pipe, width)
    assert unet_widths(pipe) == [8, 11], "the pinned 64 stays; one more size is kept"
    stats = pipe.unet.stats()
    assert (stats.cached, stats.pinned, stats.evictions) == (2, 1, 2)
    assert pipe.text_encoders[0].stats().pinned == 1


def test_a_session_is_not_freed_under_a_running_call(make_pipe):
    pipe = make_pipe(max_sessions=1)
    vae = pipe.vae
    feeds_a, dims_a = decode_feeds(64)
    vae.run(feeds_a, dims_a)
    key_a = vae.key(dims_a)
    with vae.cache.use(key_a) as session_a:
        alive = weakref.ref(session_a)
    inside, leave = threading.Event(), threading.Event()
    real_run = session_a.run

    def blocking_run(*args, **kwargs):
        inside.set()
        assert leave.wait(GUARD_S)
        return real_run(*args, **kwargs)

    session_a.run = blocking_run
    del session_a
    results = []
    caller = threading.Thread(target=lambda: results.append(vae.run(feeds_a, dims_a)))
    caller.start()
    assert inside.wait(GUARD_S)

    vae.run(*decode_feeds(72))  # another size while the only slot holds a session in use
    assert key_a in vae.loaded_shapes and alive() is not None, "a session in use is never evicted"
    assert vae.loaded_shapes == [key_a], "the other size went as soon as its call ended: back to the bound"
    assert vae.cache.start_build(vae.key(decode_feeds(80)[1])) is None, "no room: a worker's request would wait"

    leave.set()
    caller.join(GUARD_S)
    assert results[0][0].shape == (1, 3, 64, 64), "the call finished on its session"
    vae.run(*decode_feeds(80))  # now idle, the session can go
    assert key_a not in vae.loaded_shapes
    del real_run, blocking_run  # the test's own references to the session
    gc.collect()
    assert alive() is None, "and is freed"


def test_a_bound_below_one_session_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="max_sessions .KILN_MAX_SESSIONS. must be at least 1"):
        RuntimeOptions(max_sessions=0)


# ---- the scheduler: new sizes are built off its thread ---------------------------------------


class BlockedBuilds:
    """Wraps a component's session builder: builds of other widths than `free_width` wait for
    `release` (or raise `error`); records the thread they ran on and the cache's count."""

    def __init__(self, component, free_width: int | None, error: Exception | None = None):
        self.component = component
        self.real = component._create
        self.free_width = free_width
        self.error = error
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []
        self.counted: list[int] = []  # unpinned sessions + builds in flight, at each build
        component._create = self

    def __call__(self, dims: dict[str, int]):
        if self.free_width is None or dims.get("width") != self.free_width:
            self.threads.append(threading.current_thread().name)
            stats = self.component.stats()
            self.counted.append(stats.cached - stats.pinned + stats.building)
            self.started.set()
            if self.error is not None:
                raise self.error
            assert self.release.wait(GUARD_S)
        return self.real(dims)


class Recorder:
    def __init__(self):
        self.events: list = []
        self.done = threading.Event()
        self.progressed = threading.Event()  # a step ran (with progress=True)
        self.finished_at = 0.0

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (JobResult, JobFailed)):
            self.finished_at = time.monotonic()
            self.done.set()
        else:
            self.progressed.set()


def submit(scheduler: Scheduler, width: int, steps: int, progress: bool = False) -> Recorder:
    recorder = Recorder()
    request = scheduler.pipelines["sd1"].resolve(ImageRequest(prompt="a red circle", width=width, height=64, seed=0, steps=steps))
    key = scheduler.key_for("sd1", width, 64)
    scheduler.submit(Job("sd1", request, key, 1, recorder, progress=progress))
    return recorder


@pytest.fixture
def serving(make_pipe):
    """A started scheduler over the tiny package, warmed up (and pinned) at 64x64."""
    made = []

    def make(max_sessions: int = 4) -> tuple[Pipeline, Scheduler]:
        pipe = make_pipe(max_sessions)
        scheduler = Scheduler({"sd1": pipe}, max_batch=4)
        scheduler.warm_up("sd1", 64, 64, 1)
        scheduler.start()
        made.append(scheduler)
        return pipe, scheduler

    yield make
    for scheduler in made:
        scheduler.close()


def test_a_new_size_is_built_in_the_background_while_other_requests_keep_stepping(serving):
    pipe, scheduler = serving()
    builds = BlockedBuilds(pipe.unet, free_width=8)
    new_size = submit(scheduler, 96, steps=2)
    assert builds.started.wait(GUARD_S)

    warm = submit(scheduler, 64, steps=6, progress=True)
    assert warm.done.wait(GUARD_S)
    assert isinstance(warm.events[-1], JobResult)
    assert sum(1 for e in warm.events if not isinstance(e, JobResult)) == 6, "every step ran meanwhile"
    assert not builds.release.is_set() and new_size.events == [], "while the new size's build was still blocked"
    _, gauges = scheduler.metrics()
    assert gauges["requests_waiting_for_sessions"] == 1 and gauges["sessions_building"] >= 1

    builds.release.set()
    assert new_size.done.wait(GUARD_S) and isinstance(new_size.events[-1], JobResult)
    assert builds.threads == ["kiln-session-build_0"], "built on the builder thread, not the scheduler's"
    counters, _ = scheduler.metrics()
    assert counters["requests_waited_for_sessions"] == 1


def test_a_failed_build_fails_only_the_request_that_needed_it(serving):
    pipe, scheduler = serving()
    BlockedBuilds(pipe.unet, free_width=8, error=PackageError("onnxruntime cannot load unet/model.onnx: out of memory"))
    broken = submit(scheduler, 96, steps=2)
    fine = submit(scheduler, 64, steps=2)
    assert broken.done.wait(GUARD_S) and fine.done.wait(GUARD_S)
    assert isinstance(fine.events[-1], JobResult)
    error = broken.events[-1].error
    assert isinstance(error, EngineError)
    assert str(error) == "could not build the unet session for height=8, width=12: onnxruntime cannot load unet/model.onnx: out of memory"
    counters, _ = scheduler.metrics()
    assert counters["session_build_failures"] == 1 and counters["requests_failed"] == 1


def test_with_every_slot_in_use_a_new_size_waits_and_the_bound_holds(serving):
    pipe, scheduler = serving(max_sessions=1)
    builds = BlockedBuilds(pipe.unet, free_width=None)
    builds.release.set()
    first = submit(scheduler, 72, steps=6)
    second = submit(scheduler, 80, steps=2)
    third = submit(scheduler, 88, steps=2)
    for recorder in (first, second, third):
        assert recorder.done.wait(GUARD_S) and isinstance(recorder.events[-1], JobResult)
    assert max(builds.counted) == 1, "never more than max_sessions unpinned UNet sessions, builds included"
    assert unet_widths(pipe) == [8, 11], "the pinned warm-up size and the last size"
    counters, gauges = scheduler.metrics()
    assert counters["session_evictions"] == 2 * 2, "the UNet's and the VAE decoder's 72 and 80"
    assert gauges["sessions_pinned"] >= 3 and gauges["sessions_building"] == 0
    assert key_of({"height": 8, "width": 8}) in pipe.unet.loaded_shapes


def test_a_request_cancelled_or_expired_while_its_size_is_built_leaves_nothing_held(serving):
    pipe, scheduler = serving()
    builds = BlockedBuilds(pipe.unet, free_width=8)
    cancelled = Recorder()
    request = pipe.resolve(ImageRequest(prompt="a red circle", width=96, height=64, seed=0, steps=2))
    job = Job("sd1", request, scheduler.key_for("sd1", 96, 64), 1, cancelled)
    scheduler.submit(job)
    assert builds.started.wait(GUARD_S)
    scheduler.cancel(job)
    assert cancelled.done.wait(GUARD_S) and isinstance(cancelled.events[-1].error, RequestCancelledError)

    expiring = Recorder()
    request = pipe.resolve(ImageRequest(prompt="a red circle", width=104, height=64, seed=0, steps=2))
    deadline = time.monotonic() + 0.2  # passes while the loop sleeps, waiting for the blocked build
    scheduler.submit(Job("sd1", request, scheduler.key_for("sd1", 104, 64), 1, expiring, deadline=deadline))
    assert expiring.done.wait(GUARD_S) and isinstance(expiring.events[-1].error, DeadlineExceededError)

    builds.release.set()
    assert scheduler.wait_idle(GUARD_S)
    again = submit(scheduler, 96, steps=1)
    assert again.done.wait(GUARD_S) and isinstance(again.events[-1], JobResult)
    assert all(entry.holders == 0 for entry in pipe.unet.cache._entries.values()), "no hold outlives its request"


def test_without_batching_a_new_size_waits_for_its_build_then_runs(make_pipe):
    pipe = make_pipe(max_sessions=4)
    scheduler = Scheduler({"sd1": pipe}, max_batch=4, batching=False)
    scheduler.start()
    try:
        first, second = submit(scheduler, 96, steps=1), submit(scheduler, 64, steps=1)
        for recorder in (first, second):
            assert recorder.done.wait(GUARD_S) and isinstance(recorder.events[-1], JobResult)
    finally:
        scheduler.close()


@pytest.mark.parametrize("batching", [False, True])
def test_a_request_for_a_new_size_is_not_overtaken_by_later_ones_holding_its_room(make_pipe, batching):
    """One slot: A (72 wide) runs, W (80) waits for the room A's size holds, then X (72) arrives.
    X must not hold A's size while it waits behind W: without batching that left W without room
    for good (a deadlock); with batching a stream of such requests could starve W."""
    pipe = make_pipe(max_sessions=1)
    scheduler = Scheduler({"sd1": pipe}, max_batch=4, batching=batching)
    scheduler.start()
    finished: list[str] = []
    try:
        running = submit(scheduler, 72, steps=20, progress=True)
        assert running.progressed.wait(GUARD_S)  # admitted and stepping: it holds its size
        new_size, later = submit(scheduler, 80, steps=1), submit(scheduler, 72, steps=1)
        for name, recorder in (("running", running), ("new size", new_size), ("later", later)):
            assert recorder.done.wait(GUARD_S), f"{name} never finished"
            assert isinstance(recorder.events[-1], JobResult), recorder.events[-1]
        recorders = {"running": running, "new size": new_size, "later": later}
        finished = sorted(recorders, key=lambda name: recorders[name].finished_at)
    finally:
        scheduler.close()
    assert finished == ["running", "new size", "later"]  # oldest first


def test_a_worker_started_with_session_cache_keeps_that_many_sizes(tiny_package, tmp_path):
    """`kiln worker --session-cache 1` (what `workers.session_cache` sets): three new sizes, one kept
    per component beside the pinned warm-up size, the others evicted."""
    from engine.client.pool import WorkerPool
    from engine.client.types import ImageRequest as Request
    from tests._workers import arun, metrics, start_workers

    workers = start_workers(tiny_package("sd1"), log_dir=tmp_path, session_cache=1, restart=False)
    try:

        async def run():
            async with WorkerPool(workers.addresses) as pool:
                for width in (72, 80, 88):  # one at a time: each waits for its own sessions
                    await pool.generate(Request(model="sd1", prompt="a dot", width=width, height=64, seed=0, steps=1), timeout=120)

        arun(run())
        values = metrics(workers.addresses[0])
    finally:
        workers.stop()
    components = 2  # the UNet and the VAE decoder of each drawn size
    assert values["sessions_cached"] - values["sessions_pinned"] <= components
    assert values["session_evictions"] >= 2 * components, values
