"""The batching policy of engine.worker.scheduler, in-process, over a pipeline that only records.

The recording pipeline advances samples without a model, so these tests pin the order of UNet
calls, their batches and the admission rules exactly.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from engine.manifest import SizeLimits

import numpy as np
import pytest

from engine.errors import QueueFullError, RequestCancelledError
from engine.request import ImageRequest, LoraChoice
from engine.worker.scheduler import STICKY_CALLS, Job, JobFailed, JobResult, Scheduler


class FakeSample:
    def __init__(self, request: ImageRequest, tag):
        self.request = request
        self.tag = tag
        self.x = np.zeros((4, request.height // 8, request.width // 8), dtype=np.float32)
        self.step = 0
        self.plan = SimpleNamespace(num_steps=request.steps)
        self.unet_variant = RecordingPipeline.unet_variant(request)

    @property
    def steps_done(self):
        return self.step

    @property
    def total_steps(self):
        return self.plan.num_steps

    @property
    def shape(self):
        return self.x.shape

    @property
    def done(self):
        return self.step >= self.plan.num_steps


class RecordingPipeline:
    manifest = SimpleNamespace(latent_channels=4, vae_scale_factor=8, sizes=SizeLimits(64, 2048, 8, "512x512", "512x512"))

    def __init__(self):
        self.calls: list[tuple[int, list[int]]] = []  # (latent width, [job ids]) per UNet call
        self.prepared: list[int] = []  # requests per prepare call
        self.decoded: list[int] = []  # samples per VAE call
        self.after_step = None  # hook(call number), runs in the scheduler thread

    def session_keys(self, request):
        return []  # nothing built per size: every request is admitted at once

    @staticmethod
    def unet_variant(request):
        return tuple(sorted((c.name, c.scale) for c in request.loras if c.scale))

    def session_stats(self):
        return {}

    def prepare(self, requests, tags):
        self.prepared.append(len(requests))
        return [FakeSample(r, (t, k)) for r, t in zip(requests, tags) for k in range(r.n)]

    def denoise_step(self, samples):
        self.calls.append((samples[0].shape[2] * 8, [s.tag[0].id for s in samples]))
        for s in samples:
            s.step += 1
        if self.after_step:
            self.after_step(len(self.calls))

    def decode(self, samples, paste_back=True):
        self.decoded.append(len(samples))
        return [np.zeros((8, 8, 3), dtype=np.uint8) for _ in samples]


def make_job(scheduler: Scheduler, size: int, steps: int, n: int = 1, loras=()) -> tuple[Job, list]:
    events: list = []
    request = ImageRequest(prompt="x", width=size, height=size, seed=0, n=n, steps=steps, loras=tuple(loras))
    return Job("m", request, scheduler.key_for("m", size, size, request), 1, events.append), events


@pytest.fixture
def pipe():
    return RecordingPipeline()


def run(scheduler: Scheduler) -> None:
    scheduler.start()
    assert scheduler.wait_idle(10)
    scheduler.close()


def test_groups_of_different_sizes_take_turns(pipe):
    s = Scheduler({"m": pipe}, max_batch=4)
    small, _ = make_job(s, 64, steps=3)
    large, _ = make_job(s, 128, steps=3)
    s.submit(small)
    s.submit(large)
    run(s)
    assert [width for width, _ in pipe.calls] == [64, 128, 64, 128, 64, 128]
    assert pipe.prepared == [2], "both prompts were text-encoded in one call"


def test_samples_share_a_unet_call_only_with_the_same_loras(pipe):
    """One UNet call runs one set of weights: LoRA variants of one size step as their own groups,
    taking turns; requests with the same LoRAs (any order, scale 0 left out) batch together."""
    s = Scheduler({"m": pipe}, max_batch=8)
    style = (LoraChoice(name="style", scale=0.8),)
    base, _ = make_job(s, 64, steps=2)
    base_too, _ = make_job(s, 64, steps=2, loras=[LoraChoice(name="style", scale=0.0)])
    styled, _ = make_job(s, 64, steps=2, loras=style)
    both, _ = make_job(s, 64, steps=2, loras=[LoraChoice(name="ink", scale=1.0), *style])
    both_again, _ = make_job(s, 64, steps=2, loras=[*style, LoraChoice(name="ink", scale=1.0)])
    for job in (base, base_too, styled, both, both_again):
        s.submit(job)
    run(s)
    groups = [sorted(ids) for _, ids in pipe.calls]
    assert groups == [sorted([base.id, base_too.id]), [styled.id], sorted([both.id, both_again.id])] * 2
    assert pipe.prepared == [5], "every prompt was still text-encoded at one admission"


def test_a_runtime_that_refits_per_variant_keeps_a_variants_turn(pipe):
    """TensorRT refits an engine to switch LoRAs: two variants of one size take turns in runs of
    STICKY_CALLS calls, not call by call; another size still gets its turn in between."""
    pipe.variant_switch_cost = True
    s = Scheduler({"m": pipe}, max_batch=8)
    a, _ = make_job(s, 64, steps=10, loras=[LoraChoice(name="a", scale=1.0)])
    b, _ = make_job(s, 64, steps=10, loras=[LoraChoice(name="b", scale=1.0)])
    other, _ = make_job(s, 128, steps=2)
    for job in (a, b, other):
        s.submit(job)
    run(s)
    at_64 = [ids[0] for width, ids in pipe.calls if width == 64]
    switches = sum(1 for x, y in zip(at_64, at_64[1:]) if x != y)
    assert at_64 == [a.id] * STICKY_CALLS + [b.id] * STICKY_CALLS + [a.id, a.id, b.id, b.id]
    assert switches == 3  # call by call it would be 19
    assert [width for width, _ in pipe.calls][:3] == [64, 128, 64], "the other size was not held up"


def test_a_request_joins_the_running_batch_at_the_next_step_and_leaves_when_done(pipe):
    s = Scheduler({"m": pipe}, max_batch=4)
    first, _ = make_job(s, 64, steps=5)
    second, second_events = make_job(s, 64, steps=2)
    pipe.after_step = lambda call: s.submit(second) if call == 1 else None
    s.submit(first)
    run(s)
    assert [ids for _, ids in pipe.calls] == [[first.id], [first.id, second.id], [first.id, second.id], [first.id], [first.id]]
    assert isinstance(second_events[-1], JobResult)


def test_a_full_group_holds_its_own_requests_but_not_other_sizes(pipe):
    s = Scheduler({"m": pipe}, max_batch=2)
    a, _ = make_job(s, 64, steps=2, n=2)  # fills the 64 group
    b, _ = make_job(s, 64, steps=2)  # waits for room
    c, _ = make_job(s, 128, steps=2)  # another size: not held up behind b
    for job in (a, b, c):
        s.submit(job)
    run(s)
    assert pipe.calls[:2] == [(64, [a.id, a.id]), (128, [c.id])]
    assert (64, [b.id]) in pipe.calls[2:]


def test_finished_samples_are_decoded_in_one_call(pipe):
    s = Scheduler({"m": pipe}, max_batch=8)
    job, events = make_job(s, 64, steps=2, n=3)
    s.submit(job)
    run(s)
    assert pipe.decoded == [3]
    result = events[-1]
    assert isinstance(result, JobResult) and result.seeds == [0, 1, 2] and len(result.images_png) == 3


def test_without_batching_requests_run_one_at_a_time(pipe):
    s = Scheduler({"m": pipe}, max_batch=8, batching=False)
    jobs = [make_job(s, 64, steps=2)[0] for _ in range(3)]
    for job in jobs:
        s.submit(job)
    run(s)
    assert [ids for _, ids in pipe.calls] == [[j.id] for j in jobs for _ in range(2)]


def test_a_full_queue_refuses_before_any_work(pipe):
    s = Scheduler({"m": pipe}, max_batch=1, max_queue=2)
    s.submit(make_job(s, 64, steps=1)[0])
    s.submit(make_job(s, 64, steps=1)[0])
    with pytest.raises(QueueFullError, match="queue is full"):
        s.submit(make_job(s, 64, steps=1)[0])
    assert pipe.prepared == [] and s.metrics()[0]["requests_rejected"] == 1
    run(s)


def test_a_cancelled_request_leaves_at_the_next_step_and_its_steps_are_counted_as_freed(pipe):
    s = Scheduler({"m": pipe}, max_batch=4)
    job, events = make_job(s, 64, steps=10)
    pipe.after_step = lambda call: s.cancel(job) if call == 3 else None
    s.submit(job)
    run(s)
    assert len(pipe.calls) == 3
    assert isinstance(events[-1], JobFailed) and isinstance(events[-1].error, RequestCancelledError)
    counters, _ = s.metrics()
    assert counters["freed_steps"] == 7 and counters["requests_cancelled"] == 1


def test_an_engine_failure_fails_only_the_requests_of_that_call(pipe):
    s = Scheduler({"m": pipe}, max_batch=4)
    bad, bad_events = make_job(s, 64, steps=2)
    good, good_events = make_job(s, 128, steps=2)
    real_step = pipe.denoise_step

    def denoise_step(samples):
        if samples[0].shape[2] == 8:
            raise RuntimeError("onnxruntime: out of memory")
        real_step(samples)

    pipe.denoise_step = denoise_step
    s.submit(bad)
    s.submit(good)
    run(s)
    assert isinstance(bad_events[-1], JobFailed) and "out of memory" in str(bad_events[-1].error)
    assert isinstance(good_events[-1], JobResult)


def test_the_loop_runs_in_its_own_thread(pipe):
    s = Scheduler({"m": pipe})
    seen = []
    pipe.after_step = lambda call: seen.append(threading.current_thread().name)
    s.submit(make_job(s, 64, steps=1)[0])
    run(s)
    assert seen == ["kiln-scheduler"]


def test_a_fault_in_the_loop_fails_the_requests_instead_of_leaving_them_hanging(pipe):
    s = Scheduler({"m": pipe}, max_batch=4)
    job, events = make_job(s, 64, steps=3)
    real_step = pipe.denoise_step

    def corrupting_step(samples):
        real_step(samples)
        for sample in samples:
            sample.plan = None  # the scheduler's own bookkeeping now raises AttributeError

    pipe.denoise_step = corrupting_step
    s.submit(job)
    s.start()
    assert s.wait_idle(10)
    assert isinstance(events[-1], JobFailed) and "scheduler failed" in str(events[-1].error)
    pipe.denoise_step = real_step
    again, again_events = make_job(s, 64, steps=1)
    s.submit(again)
    assert s.wait_idle(10) and isinstance(again_events[-1], JobResult), "the loop keeps serving"
    s.close()
