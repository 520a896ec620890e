"""One real worker process on a loopback port, called as a standard v2 server and through the pool.

The worker serves two packages (tiny SD1 and tiny SD2 v-prediction) from one scheduler."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from engine.client.pool import WorkerPool
from engine.client.types import ImageRequest
from engine.errors import DeadlineExceededError
from engine.worker import inference_pb2 as pb
from tests._workers import (
    TOLERANCE,
    V2,
    arun,
    infer_request,
    max_diff,
    metrics,
    output,
    pixels,
    raw_infer_request,
    start_workers,
    wait_for,
)


@pytest.fixture(scope="module")
def worker(tiny_package, tmp_path_factory):
    workers = start_workers([tiny_package("sd1"), tiny_package("sd2v")], log_dir=tmp_path_factory.mktemp("logs"))
    yield workers.addresses[0]
    assert workers.stop() == [0]


@pytest.fixture
def v2(worker):
    client = V2(worker)
    yield client
    client.close()


def test_health_and_metadata_answer_as_the_v2_protocol_says(v2):
    assert v2.ServerLive(pb.ServerLiveRequest()).live
    assert v2.ServerReady(pb.ServerReadyRequest()).ready
    assert v2.ModelReady(pb.ModelReadyRequest(name="sd1")).ready
    assert not v2.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    server = v2.ServerMetadata(pb.ServerMetadataRequest())
    assert server.name == "kiln" and "kiln_stream_infer" in server.extensions
    meta = v2.ModelMetadata(pb.ModelMetadataRequest(name="sd1"))
    assert {t.name: t.datatype for t in meta.inputs}["prompt"] == "BYTES"
    assert {t.name for t in meta.outputs} == {"images", "seeds", "prompt_tokens"}
    assert meta.parameters["max_batch"].int64_param == 4
    index = v2.RepositoryIndex(pb.RepositoryIndexRequest())
    assert sorted((m.name, m.state) for m in index.models) == [("sd1", "READY"), ("sd2v", "READY")]


def test_one_worker_serves_several_packages_from_one_loop(worker):
    async def run():
        async with WorkerPool([worker]) as pool:
            return await asyncio.gather(
                *(
                    pool.generate(ImageRequest(model=m, prompt="a cat", width=64, height=64, seed=s, steps=6), timeout=60)
                    for m in ("sd1", "sd2v")
                    for s in (1, 2)
                )
            )

    results = arun(run())
    assert [r.seeds for r in results] == [[1], [2], [1], [2]]
    assert max_diff(results[0].images_png[0], results[2].images_png[0]) > TOLERANCE, "two models, two images"


def test_a_hand_built_v2_request_gets_png_images_seeds_and_token_count(v2):
    resp = v2.ModelInfer(raw_infer_request(prompt="a red circle", width=64, height=64, seed=11, steps=3, n=2), timeout=60)
    images = output(resp, "images")
    assert images.datatype == "BYTES" and list(images.shape) == [2]
    assert all(png.startswith(b"\x89PNG") for png in images.contents.bytes_contents)
    assert pixels(images.contents.bytes_contents[0]).shape == (64, 64, 3)
    assert list(output(resp, "seeds").contents.int64_contents) == [11, 12]
    assert output(resp, "prompt_tokens").contents.int64_contents[0] > 0
    assert resp.parameters["engine_seconds"].double_param > 0


def test_settings_as_parameters_give_the_same_image_as_inputs(v2):
    by_inputs = v2.ModelInfer(infer_request(prompt="a cat", width=64, height=64, seed=5, steps=3), timeout=60)
    req = infer_request(prompt="a cat")
    for name, value in (("width", 64), ("height", 64), ("seed", 5), ("steps", 3)):
        req.parameters[name].int64_param = value
    by_params = v2.ModelInfer(req, timeout=60)
    a, b = (output(r, "images").contents.bytes_contents[0] for r in (by_inputs, by_params))
    assert max_diff(a, b) == 0


@pytest.mark.parametrize(
    "values, param",
    [
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(width=65), "size"),
        (dict(sampler="plms"), "sampler"),
        (dict(n=0), "n"),
        (dict(colour="red"), "colour"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_parameter(v2, values, param):
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(infer_request(prompt="a cat", height=64, **{"width": 64, **values}), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param in info.value.details()
    assert ("kiln-param", param) in info.value.trailing_metadata()


def test_an_empty_prompt_is_invalid_argument(v2):
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(infer_request(prompt="  ", width=64, height=64), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details()


def test_an_unknown_model_is_not_found(v2):
    with pytest.raises(grpc.RpcError) as info:
        v2.ModelInfer(infer_request(model="sdxl-turbo", prompt="a cat"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "sd1" in info.value.details()


def test_the_stream_reports_each_step_with_previews_then_the_result(v2):
    req = infer_request(prompt="a cat", width=64, height=64, seed=1, steps=4, n=2, preview_every=2)
    messages = [m.infer_response for m in v2.ModelInferStream(req, timeout=60)]
    progress = [(m.parameters["image_index"].int64_param, m.parameters["step"].int64_param) for m in messages[:-1]]
    assert sorted(progress) == [(i, s) for i in range(2) for s in range(1, 5)]
    previews = [m for m in messages[:-1] if m.outputs]
    assert previews and all(output(m, "preview").contents.bytes_contents[0][:2] == b"\xff\xd8" for m in previews)
    last = messages[-1]
    assert last.parameters["kiln_event"].string_param == "result"
    assert list(output(last, "seeds").contents.int64_contents) == [1, 2]


def test_same_seed_same_pixels_alone_and_inside_a_busy_mixed_batch(worker):
    target = ImageRequest(model="sd1", prompt="a green square", width=64, height=64, seed=42, steps=8,
                              guidance_scale=7.5, sampler="euler_a")  # fmt: skip
    others = [
        ImageRequest(model="sd1", prompt="noise", width=64, height=64, seed=1, steps=20, guidance_scale=1.0, sampler="ddim"),
        ImageRequest(model="sd1", prompt="a circle", width=64, height=64, seed=2, steps=14, guidance_scale=3.0, sampler="dpmpp_2m_karras"),
        ImageRequest(model="sd1", prompt="two stars", width=96, height=64, seed=3, steps=10),
        ImageRequest(model="sd1", prompt="a red cross", width=64, height=64, seed=4, steps=16, n=2, sampler="euler"),
    ]  # fmt: skip

    async def run():
        async with WorkerPool([worker]) as pool:
            alone = await pool.generate(target, timeout=60)
            before = metrics(worker)
            started = asyncio.Event()
            busy = [asyncio.create_task(pool.generate(p, timeout=60, on_progress=lambda _: started.set())) for p in others]
            await started.wait()  # the target joins a batch that is already running
            mixed = await pool.generate(target, timeout=60)
            await asyncio.gather(*busy)
            return alone, mixed, before, metrics(worker)

    alone, mixed, before, after = arun(run())
    assert max_diff(alone.images_png[0], mixed.images_png[0]) <= TOLERANCE
    steps = after["sample_steps"] - before["sample_steps"]
    calls = after["unet_calls"] - before["unet_calls"]
    assert steps / calls > 1.5, "the requests should have shared UNet calls"


def test_cancelling_the_caller_frees_the_remaining_steps(worker):
    long = ImageRequest(model="sd1", prompt="a cat", width=128, height=128, seed=9, steps=150)

    async def run():
        async with WorkerPool([worker]) as pool:
            started = asyncio.Event()
            task = asyncio.create_task(pool.generate(long, on_progress=lambda _: started.set()))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    before = metrics(worker)
    arun(run())
    assert wait_for(lambda: metrics(worker)["requests_cancelled"] == before["requests_cancelled"] + 1, 10)
    after = metrics(worker)
    assert after["freed_steps"] - before["freed_steps"] > 100
    assert after["live_requests"] == 0


def test_an_expired_deadline_frees_the_remaining_steps(worker):
    long = ImageRequest(model="sd1", prompt="a cat", width=192, height=192, seed=9, steps=150)

    async def run():
        async with WorkerPool([worker]) as pool:
            with pytest.raises(DeadlineExceededError):
                await pool.generate(long, timeout=0.25)

    assert wait_for(lambda: metrics(worker)["live_requests"] == 0, 30), "the worker is idle, so its counters are this request's"
    before = metrics(worker)
    arun(run())
    assert wait_for(lambda: metrics(worker)["requests_expired"] == before["requests_expired"] + 1, 10)
    assert wait_for(lambda: metrics(worker)["running_images"] == 0, 10)
    after = metrics(worker)
    ran = after["sample_steps"] - before["sample_steps"]  # the only request on the worker: its steps
    freed = after["freed_steps"] - before["freed_steps"]
    assert ran < long.steps, "the deadline passed long before 150 steps were done"
    assert freed == long.steps - ran, "every step not run is freed, and none twice"
    assert after["live_requests"] == 0


def test_a_short_request_does_not_wait_behind_a_long_one_of_another_size(worker):
    long = ImageRequest(model="sd1", prompt="a cat", width=128, height=128, seed=9, steps=150)
    short = ImageRequest(model="sd1", prompt="a dog", width=64, height=64, seed=1, steps=4)

    async def run():
        async with WorkerPool([worker]) as pool:
            progress = []
            started = asyncio.Event()

            def on_progress(p):
                progress.append(p.step)
                started.set()

            task = asyncio.create_task(pool.generate(long, timeout=120, on_progress=on_progress))
            await started.wait()
            await pool.generate(short, timeout=60)
            at = progress[-1]
            task.cancel()
            return at

    long_step_when_short_done = arun(run())
    assert long_step_when_short_done < 100, "the short request finished while the long one was still running"
