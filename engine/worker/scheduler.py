"""Step-level continuous batching: one thread runs every UNet call of the worker.

A request (a `Job`, n images) waits in a bounded admission queue, joins the running set at the next
step boundary and leaves it as soon as its own last step is done, so a short request never waits
behind a long one and the UNet never idles while work is queued.

Each iteration of the loop:
  1. drops the samples of cancelled, expired or failed requests (the steps they would still have
     taken are counted in `freed_steps`);
  2. holds the sessions of the waiting requests whose sizes are built (`Pipeline.session_keys`)
     and starts building the missing ones on the pipeline's builder thread, while the caches have
     room (engine/session_cache.py: a bounded number per component, warm-up sizes pinned). A
     request whose sessions are not ready waits, out of the batch, and the loop goes on stepping
     the others: a new size never stalls them. A failed build fails only the requests needing it;
  3. admits waiting requests whose sessions it holds, oldest first, into their group (model,
     latent shape, UNet LoRAs) while the group holds fewer than `max_batch` samples; a request whose group
     is full waits, and so does every later request of that group (first come, first served
     within a group), but requests of other groups are not held up behind it. All prompts
     admitted at one boundary are text-encoded in one `Pipeline.prepare` call per model;
  4. picks one group round-robin: every group with running samples gets one UNet call per round,
     and a group that becomes busy joins the round at the back. A group therefore waits at most
     (number of other groups) calls between two of its steps: no size starves, whatever the mix.
     (On a runtime where switching LoRA variants costs a refit, a group may keep the turn for up
     to STICKY_CALLS calls before another variant of its size takes it.)
  5. advances up to `max_batch` of that group's samples, oldest first, by one step with one UNet
     call (each sample at its own step, sampler and guidance: `Pipeline.denoise_step`);
  6. decodes the samples that just finished, in one VAE call, and hands their pixels to a thread
     pool that encodes the PNGs, so encoding never holds up the next step.

A request holds its sessions from when they are ready until its last sample is decoded (or it
fails), so none of them is evicted while it runs. When an iteration has nothing to do (every
waiting request waits for a build), the loop sleeps until a build ends, a request arrives or
is cancelled, or the nearest waiting deadline.

With `batching=False` the loop admits one request at a time and admits the next only when it has
finished: the baseline the benchmark compares against.

Backpressure: `submit` refuses at once with QueueFullError when the waiting requests already hold
`max_queue` images; nothing of a refused request is computed, not even its text encoding.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from engine.client.types import Progress
from engine.errors import (
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    KilnError,
    QueueFullError,
    RequestCancelledError,
    WorkerUnavailableError,
)
from engine.pipeline import Pipeline, Sample
from engine.request import ImageRequest, steps_run
from engine.session_cache import Key, Lease, describe
from engine.shapes import latent_shape, render_size
from engine.worker import faults
from engine.worker.images import encode_png, latent_preview_jpeg

log = logging.getLogger(__name__)

# (model name, latent shape (C, h, w), UNet LoRA variant): samples that can share a UNet call
GroupKey = tuple[str, tuple[int, ...], tuple]


@dataclass(frozen=True)
class JobResult:
    images_png: list[bytes]  # n PNG files, in seed order
    seeds: list[int]
    prompt_tokens: int
    engine_seconds: float


@dataclass(frozen=True)
class JobFailed:
    error: BaseException


Event = Union[Progress, JobResult, JobFailed]

_ids = itertools.count(1)

COUNTERS = (
    "requests_received",  # accepted into the queue
    "requests_rejected",  # refused: queue full
    "requests_admitted",  # moved from the queue into the running set
    "requests_completed",
    "requests_failed",  # any failure, cancellations and deadlines included
    "requests_cancelled",
    "requests_expired",  # deadline passed
    "images_completed",
    "text_encoder_calls",  # one per admission boundary and model
    "unet_calls",
    "sample_steps",  # samples advanced by one step; sample_steps / unet_calls = mean batch
    "vae_calls",
    "freed_steps",  # sample-steps not run because their request was cancelled, expired or failed
    "requests_waited_for_sessions",  # waited out of the batch while their size's sessions were built
)
# Summed over every pipeline's session caches (engine/session_cache.py CacheStats).
SESSION_COUNTERS = {"builds": "session_builds", "build_failures": "session_build_failures", "evictions": "session_evictions"}
SESSION_GAUGES = {"cached": "sessions_cached", "pinned": "sessions_pinned", "building": "sessions_building"}
# A runtime whose engine holds one LoRA variant at a time (TensorRT refits it: `Pipeline.
# variant_switch_cost`) stays on one variant's group for at most this many UNet calls in a row
# while another variant of the same size waits, rather than switching at every call.
STICKY_CALLS = 8
# The longest the loop sleeps with requests waiting and nothing to run: a safety net, since every
# event that can make a waiting request admissible wakes it (a build ending, a release, a submit).
IDLE_WAIT_S = 1.0


class Job:
    """One request of n images. `sink` receives its events from the scheduler's threads: Progress
    (only if `progress`), then exactly one JobResult or JobFailed."""

    def __init__(
        self,
        model: str,
        request: ImageRequest,  # resolved (defaults filled); image k uses seed + k
        key: GroupKey,
        prompt_tokens: int,
        sink: Callable[[Event], None],
        deadline: float | None = None,  # time.monotonic() value
        progress: bool = False,
        preview_every: int = 0,
    ):
        self.id = next(_ids)
        self.model = model
        self.request = request
        self.key = key
        self.n = request.n
        self.total_steps = request.n * steps_run(request)
        self.prompt_tokens = prompt_tokens
        self.sink = sink
        self.deadline = deadline
        self.progress = progress
        self.preview_every = preview_every
        self.submitted = time.perf_counter()
        self.cancel_reason: str | None = None  # "cancelled" | "expired", set from any thread
        self.finished = False
        self.on_finish: Callable[[Job, BaseException | None], None] | None = None
        self._pngs: list[bytes | None] = [None] * self.n
        self._left = self.n
        self._lock = threading.Lock()
        self.samples_left = 0  # loop thread only: samples admitted and not yet decoded or dropped
        # The sessions it runs on: None until they are built and held, then held until its last
        # sample is decoded or it fails (`release_sessions`).
        self.leases: list[Lease] | None = None
        self.builds: dict[tuple[str, Key], Future] = {}  # loop thread only: the builds it waits for
        self.waited_for_sessions = False

    def hold_sessions(self, leases: list[Lease]) -> None:
        """Keep `leases` until `release_sessions`; released at once if the job has finished."""
        with self._lock:
            if not self.finished:
                self.leases = leases
                return
        for lease in leases:
            lease.release()

    def release_sessions(self) -> None:
        """Let its sessions be evicted again (from any thread, any number of times)."""
        with self._lock:
            leases, self.leases = self.leases or [], []
        for lease in leases:
            lease.release()

    def stop_reason(self, now: float) -> str | None:
        if self.finished:
            return "failed"
        if self.cancel_reason:
            return self.cancel_reason
        if self.deadline is not None and now >= self.deadline:
            return "expired"
        return None

    def fail(self, error: BaseException) -> bool:
        with self._lock:
            if self.finished:
                return False
            self.finished = True
        self.emit(JobFailed(error))
        if self.on_finish:
            self.on_finish(self, error)
        return True

    def add_image(self, index: int, png: bytes) -> None:
        with self._lock:
            if self.finished:
                return
            self._pngs[index] = png
            self._left -= 1
            if self._left:
                return
            self.finished = True
        self.emit(
            JobResult(
                images_png=list(self._pngs),  # type: ignore[arg-type]
                seeds=[self.request.seed + k for k in range(self.n)],
                prompt_tokens=self.prompt_tokens,
                engine_seconds=time.perf_counter() - self.submitted,
            )
        )
        if self.on_finish:
            self.on_finish(self, None)

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a sink whose caller went away must not stop the loop
            log.debug("job %d: event dropped", self.id, exc_info=True)


class Scheduler:
    def __init__(
        self,
        pipelines: dict[str, Pipeline],
        max_batch: int = 8,
        max_queue: int = 64,
        batching: bool = True,
        encode_threads: int = 2,
    ):
        self.pipelines = pipelines
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batching = batching
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()  # under _cv
        self._waiting_images = 0  # under _cv
        self._live: set[Job] = set()  # submitted and not finished, under _cv
        self._accepting = True
        self._stopping = False
        self._events = 0  # under _cv: bumped by whatever can make a waiting request admissible
        # The running set, touched by the loop thread only.
        self._groups: dict[GroupKey, list[Sample]] = {}
        self._order: deque[GroupKey] = deque()
        # (model, latent shape) -> (the UNet variant it ran last, calls in a row), for runtimes
        # whose engine switches variants at a cost (see STICKY_CALLS)
        self._engines: dict[tuple, tuple[tuple, int]] = {}
        self._running_jobs: set[Job] = set()
        self._running_images = 0  # written by the loop thread, read by metrics()
        self._counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._count_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(encode_threads, thread_name_prefix="kiln-png")
        self._thread: threading.Thread | None = None

    # ---- called from other threads ------------------------------------------------------

    def key_for(self, model: str, width: int, height: int, request: ImageRequest | None = None) -> GroupKey:
        """The group a resolved request's samples step in: one UNet call serves one model, one
        latent shape and one set of UNet LoRAs."""
        pipe = self.pipelines[model]
        m = pipe.manifest
        shape = latent_shape(*render_size(width, height, m.sizes), m.latent_channels, m.vae_scale_factor)
        return model, shape, pipe.unet_variant(request) if request is not None else ()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it at once (QueueFullError, WorkerUnavailableError)."""
        with self._cv:
            if not self._accepting:
                raise WorkerUnavailableError("the worker is draining and takes no new requests; use another worker")
            if job.n > self.max_queue:
                raise InvalidRequestError(f"n={job.n} is more than this worker's queue holds ({self.max_queue})", param="n")
            if self._waiting_images + job.n > self.max_queue:
                self._count("requests_rejected")
                raise QueueFullError(
                    f"the worker's queue is full ({self._waiting_images} images waiting, limit {self.max_queue}); "
                    f"retry later"
                )
            job.on_finish = self._finished
            self._waiting.append(job)
            self._waiting_images += job.n
            self._live.add(job)
            self._count("requests_received")
            self._events += 1
            self._cv.notify_all()

    def cancel(self, job: Job, expired: bool = False) -> None:
        """Drop a job's work at the next step boundary (the caller went away or its deadline passed)."""
        if job.cancel_reason is None and not job.finished:
            job.cancel_reason = "expired" if expired else "cancelled"
        self._wake()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every accepted job has finished; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._live, timeout)

    def fail_all(self, error: KilnError) -> None:
        """Fail every job not finished yet (shutdown after the drain timeout)."""
        with self._cv:
            jobs = list(self._live)
        for job in jobs:
            job.fail(error)
        with self._cv:
            self._cv.notify_all()

    def metrics(self) -> tuple[dict[str, int], dict[str, float]]:
        with self._count_lock:
            counters = dict(self._counts)
        with self._cv:
            gauges = {
                "queue_images": float(self._waiting_images),
                "live_requests": float(len(self._live)),
                "running_images": float(self._running_images),
                "max_batch": float(self.max_batch),
                "max_queue": float(self.max_queue),
                "batching": float(self.batching),
                "requests_waiting_for_sessions": float(sum(1 for job in self._waiting if job.builds)),
            }
        counters.update({name: 0 for name in SESSION_COUNTERS.values()})
        gauges.update({name: 0.0 for name in SESSION_GAUGES.values()})
        for pipe in self.pipelines.values():
            for stats in pipe.session_stats().values():
                for field, name in SESSION_COUNTERS.items():
                    counters[name] += getattr(stats, field)
                for field, name in SESSION_GAUGES.items():
                    gauges[name] += getattr(stats, field)
        calls = counters.get("unet_calls", 0)
        gauges["mean_batch"] = counters.get("sample_steps", 0) / calls if calls else 0.0
        return counters, gauges

    # ---- life cycle ----------------------------------------------------------------------

    def warm_up(self, model: str, width: int, height: int, batch: int) -> None:
        """One guided step, one decode and one VAE encoding at `batch` x `width`x`height`: creates the sessions and
        sizes the memory arenas before the worker says it is ready, and pins the sessions (never
        evicted, not counted against `max_sessions`). Raises what the engine raised."""
        pipe = self.pipelines[model]
        req = ImageRequest(prompt="warm-up", width=width, height=height, seed=0, n=batch, steps=2, guidance_scale=7.5)
        samples = pipe.prepare([req])
        pipe.denoise_step(samples)
        pipe.decode(samples)
        if pipe.vae_encoder is not None:  # the first edit at this size must not build its session
            draw_w, draw_h = render_size(width, height, pipe.manifest.sizes)
            pipe.vae_encode(np.zeros((1, 3, draw_h, draw_w), np.float32))
        pipe.pin_size(width, height)
        encode_png(np.zeros((height, width, 3), dtype=np.uint8))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kiln-scheduler", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout)
        self.fail_all(WorkerUnavailableError("the worker shut down before the request finished; retry"))
        self._encoder.shutdown(wait=True, cancel_futures=True)

    # ---- the loop ------------------------------------------------------------------------

    def _count(self, name: str, k: int = 1) -> None:
        with self._count_lock:
            self._counts[name] += k

    def _finished(self, job: Job, error: BaseException | None) -> None:
        job.release_sessions()
        self._count("requests_failed" if error else "requests_completed")
        if error is None:
            self._count("images_completed", job.n)
        with self._cv:
            self._live.discard(job)
            self._events += 1
            self._cv.notify_all()

    def _wake(self, _build: Future | None = None) -> None:
        """Something a waiting request may be waiting for happened (from any thread)."""
        with self._cv:
            self._events += 1
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._groups:
                    self._cv.wait()
                if self._stopping:
                    return
                seen = self._events
            try:
                busy = self._iteration()
            except Exception as e:  # a bug here must fail the requests, never leave them hanging
                log.exception("scheduler iteration failed: failing the requests it was running")
                error = EngineError(f"the worker's scheduler failed: {e}")
                with self._cv:
                    taken = [job for job in self._live if job not in self._waiting]
                for job in taken:  # running, or admitted when it failed
                    job.fail(error)
                self._running_jobs.clear()
                self._groups.clear()
                self._order.clear()
                self._engines.clear()
                continue
            if not busy:  # every waiting request waits for its sessions: sleep until that changes
                with self._cv:
                    self._cv.wait_for(lambda: self._stopping or self._events != seen, self._idle_wait())

    def _idle_wait(self) -> float:
        """Seconds until the nearest deadline of a waiting request, at most IDLE_WAIT_S (under _cv)."""
        deadlines = [job.deadline for job in self._waiting if job.deadline is not None]
        return max(0.0, min([IDLE_WAIT_S, *(d - time.monotonic() for d in deadlines)]))

    def _iteration(self) -> bool:
        """One step boundary; False when it did nothing at all (no drop, admission or step)."""
        with self._cv:
            dropped = self._drop_waiting()
            waiting = list(self._waiting)
        self._end(dropped)
        stopped = self._drop_running()
        self._end(stopped)
        failed = self._claim_sessions(waiting)
        with self._cv:
            for job, _ in failed:
                self._waiting.remove(job)
                self._waiting_images -= job.n
            admitted = self._take_admissible()
        for job, error in failed:
            job.fail(error)
        if admitted:
            self._admit(admitted)
        key = self._next_group()
        if key is not None:
            self._step(key)
        self._running_images = sum(len(samples) for samples in self._groups.values())
        return bool(dropped or stopped or failed or admitted or key is not None)

    # ---- sessions of new sizes ------------------------------------------------------------

    def _claim_sessions(self, waiting: list[Job]) -> list[tuple[Job, BaseException]]:
        """Hold the sessions of the waiting requests whose sizes are built, and start the builds
        of the oldest request still missing some, when the caches have room. Returns the requests
        whose build failed, with the error (they fail; nothing else does).

        Only the oldest waiting request builds: with two building, one's finished session is idle
        until its other components are built too, and the other's build could evict it to make
        room (and so on, back and forth, with a small `max_sessions`). Behind an oldest request
        still missing sessions, later ones take only pinned (warm-up) sessions: were they to hold
        other sizes, a steady stream of them could keep every slot busy and the oldest request
        would never get the room for its build. Without batching nothing is admitted past the
        first request, so nothing behind it holds anything."""
        failed = []
        behind = False  # an older request is still missing sessions
        for job in waiting:
            if job.leases is None and not job.finished:
                error = self._claim(job, may_build=not behind, pinned_only=behind)
                if error is not None:
                    failed.append((job, error))
                elif job.leases is None:
                    behind = True
            if behind and not self.batching:
                break
        return failed

    def _claim(self, job: Job, may_build: bool, pinned_only: bool = False) -> BaseException | None:
        """Hold every session `job` needs, or none: a request holding some while it waits for
        others could keep another request from the room its own build needs, and both would wait."""
        leases: list[Lease] = []
        ready = True
        for cache, key in self.pipelines[job.model].session_keys(job.request):
            lease = cache.hold(key, pinned_only)
            if lease is not None:
                leases.append(lease)
                continue
            ready = False
            slot = (cache.name, key)
            build = job.builds.get(slot)
            if build is not None and build.done():
                del job.builds[slot]
                if build.exception() is not None:
                    for lease in leases:
                        lease.release()
                    return build.exception()
                build = None  # built, then evicted before this request held it: build it again
            if build is None and may_build:
                build = cache.start_build(key, on_done=self._wake)  # None: no room until a request ends
                if build is not None:
                    job.builds[slot] = build
                    if not job.waited_for_sessions:
                        job.waited_for_sessions = True
                        self._count("requests_waited_for_sessions")
                        log.info("request %d waits for the %s session for %s", job.id, cache.name, describe(key))
        if not ready:
            for lease in leases:
                lease.release()
            return None
        job.builds.clear()
        job.hold_sessions(leases)
        return None

    def _end(self, stopped: list[tuple[Job, str]]) -> None:
        """Tell the callers of dropped jobs why (outside the lock: sinks may take their own)."""
        for job, reason in stopped:
            if reason == "expired":
                job.fail(DeadlineExceededError("the request's deadline passed before its images were made"))
            elif reason == "cancelled":
                job.fail(RequestCancelledError("the request was cancelled"))

    def _dropped(self, job: Job, reason: str, freed: int) -> None:
        self._count("freed_steps", freed)
        if reason in ("cancelled", "expired"):
            self._count(f"requests_{reason}")
        log.info("request %d %s: %d steps freed", job.id, reason, freed)

    def _drop_waiting(self) -> list[tuple[Job, str]]:
        now = time.monotonic()
        stopped = [(job, job.stop_reason(now)) for job in self._waiting]
        stopped = [(job, reason) for job, reason in stopped if reason]
        for job, reason in stopped:
            self._waiting.remove(job)
            self._waiting_images -= job.n
            self._dropped(job, reason, job.total_steps)
        return stopped

    def _drop_running(self) -> list[tuple[Job, str]]:
        now = time.monotonic()
        reasons = {job: job.stop_reason(now) for job in self._running_jobs}
        stopped = {job: reason for job, reason in reasons.items() if reason}
        if not stopped:
            return []
        freed: Counter[Job] = Counter()
        for key in list(self._groups):
            kept = []
            for s in self._groups[key]:
                job = s.tag[0]
                if job in stopped:
                    freed[job] += s.plan.num_steps - s.step
                else:
                    kept.append(s)
            self._set_group(key, kept)
        for job, reason in stopped.items():
            self._running_jobs.discard(job)
            self._dropped(job, reason, freed[job])
        return list(stopped.items())

    def _take_admissible(self) -> list[Job]:
        if not self._waiting:
            return []
        if not self.batching:
            if self._running_jobs or self._waiting[0].leases is None:
                return []
            taken = [self._waiting.popleft()]
        else:
            counts = {key: len(samples) for key, samples in self._groups.items()}
            blocked: set[GroupKey] = set()
            taken = []
            for job in self._waiting:
                if job.key in blocked or job.leases is None:  # a size being built waits; others go on
                    continue
                held = counts.get(job.key, 0)
                if held == 0 or held + job.n <= self.max_batch:
                    taken.append(job)
                    counts[job.key] = held + job.n
                else:
                    blocked.add(job.key)
            for job in taken:
                self._waiting.remove(job)
        self._waiting_images -= sum(job.n for job in taken)
        return taken

    def _admit(self, jobs: list[Job]) -> None:
        by_model: dict[str, list[Job]] = {}
        for job in jobs:
            by_model.setdefault(job.model, []).append(job)
        for model, group in by_model.items():
            try:
                samples = self._prepare(model, group)
            except Exception as e:
                if len(group) > 1:  # find the request at fault: each alone, so only it fails
                    log.info("admission of %d requests failed (%s): admitting them one by one", len(group), e)
                    for job in group:
                        self._admit([job])
                    continue
                (job,) = group
                if not isinstance(e, KilnError):  # a bug: its request gets a 500, the worker goes on
                    log.exception("admitting request %d failed", job.id)
                    e = EngineError(f"text or image encoding failed: {type(e).__name__}: {e}")
                job.fail(e)
                continue
            self._add_running(model, group, samples)

    def _prepare(self, model: str, group: list[Job]) -> list[Sample]:
        for job in group:
            faults.check(job.request)
        return self.pipelines[model].prepare([job.request for job in group], group)

    def _add_running(self, model: str, group: list[Job], samples: list[Sample]) -> None:
        self._count("text_encoder_calls")
        self._count("requests_admitted", len(group))
        for job in group:
            job.samples_left = job.n
            self._running_jobs.add(job)
        for s in samples:
            key = (model, s.shape, s.unet_variant)
            if key not in self._groups:
                self._groups[key] = []
                self._order.append(key)
            self._groups[key].append(s)

    def _set_group(self, key: GroupKey, samples: list[Sample]) -> None:
        if samples:
            self._groups[key] = samples
        else:
            self._groups.pop(key, None)
            if key in self._order:
                self._order.remove(key)
            if self._engines.get(key[:2], (None,))[0] == key[2]:
                del self._engines[key[:2]]  # its variant is done: the next one may take the engine

    def _next_group(self) -> GroupKey | None:
        if not self._order:
            return None
        key = next((k for k in self._order if not self._defers(k)), self._order[0])
        self._order.remove(key)
        self._order.append(key)
        if getattr(self.pipelines[key[0]], "variant_switch_cost", False):
            variant, streak = self._engines.get(key[:2], (None, 0))
            self._engines[key[:2]] = (key[2], streak + 1 if variant == key[2] else 1)
        return key

    def _defers(self, key: GroupKey) -> bool:
        """Whether `key` waits its turn: it would switch its engine to other LoRAs while the
        variant there has had fewer than STICKY_CALLS calls in a row and still has samples."""
        if not getattr(self.pipelines[key[0]], "variant_switch_cost", False):
            return False
        variant, streak = self._engines.get(key[:2], (None, 0))
        return variant is not None and variant != key[2] and streak < STICKY_CALLS and (*key[:2], variant) in self._groups

    def _step(self, key: GroupKey) -> None:
        model = key[0]
        pipe = self.pipelines[model]
        samples = self._groups[key]
        batch = samples[: self.max_batch]  # oldest first
        try:
            pipe.denoise_step(batch)
        except Exception as e:
            log.exception("denoising step failed for %d samples of %s", len(batch), key)
            self._fail_samples(key, batch, EngineError(f"a denoising step failed: {e}"))
            return
        self._count("unet_calls")
        self._count("sample_steps", len(batch))
        for s in batch:
            job, index = s.tag
            if job.progress and not job.finished:
                job.emit(Progress(image_index=index, step=s.steps_done, total_steps=s.total_steps, preview_jpeg=self._preview(job, s)))
        done = [s for s in batch if s.done]
        if not done:
            return
        self._set_group(key, [s for s in samples if not s.done])
        try:
            results = pipe.decode(done)
        except Exception as e:
            log.exception("VAE decode failed for %d samples of %s", len(done), key)
            results = [EngineError(f"decoding the image failed: {e}")] * len(done)
        self._count("vae_calls")
        for s, result in zip(done, results):
            job, index = s.tag
            job.samples_left -= 1
            if job.samples_left == 0:
                self._running_jobs.discard(job)
                job.release_sessions()  # decoded: its sizes may be evicted while its PNGs are encoded
            if isinstance(result, BaseException):
                job.fail(result)  # its other samples are dropped (and counted) at the next boundary
            else:
                self._encoder.submit(self._encode, job, index, result)

    def _fail_samples(self, key: GroupKey, batch: list[Sample], error: KilnError) -> None:
        jobs = {s.tag[0] for s in batch}
        for job in jobs:
            job.fail(error)  # its other samples are dropped at the next boundary

    @staticmethod
    def _preview(job: Job, s: Sample) -> bytes | None:
        if not job.preview_every or s.done or s.steps_done % job.preview_every:
            return None
        return latent_preview_jpeg(s.sampler.scale_model_input(s.x, s.plan, s.step))

    @staticmethod
    def _encode(job: Job, index: int, pixels: np.ndarray) -> None:
        if job.finished:
            return
        try:
            png = encode_png(pixels)  # (H, W, 3) uint8 -> PNG
        except Exception as e:
            job.fail(EngineError(f"PNG encoding failed: {e}"))
            return
        job.add_image(index, png)
