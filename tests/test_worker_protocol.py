"""The wire format and the error table, without a worker process: what goes over gRPC and back."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from engine import errors as E
from engine.client.types import ImageRequest
from engine.request import ModelLimits
from engine.worker import inference_pb2 as pb
from engine.worker import wire
from engine.worker.status import from_status, to_status
from tests._workers import infer_request, raw_infer_request


def test_client_request_decodes_to_the_same_settings():
    params = ImageRequest(
        model="m", prompt="a red circle", width=96, height=64, seed=7, n=2, negative_prompt="blur",
        steps=12, guidance_scale=5.5, sampler="ddim", preview_every=3,
    )  # fmt: skip
    decoded = wire.decode_request(wire.encode_request(params, "id-1"))
    assert decoded.id == "id-1"
    assert decoded.request == params  # one type on both sides: nothing is lost or renamed


def test_edit_fields_cross_the_wire_as_bytes():
    params = ImageRequest(model="m", prompt="at night", image=b"\x89PNG\x00\xff", mask=b"\x00\x01", strength=0.5)
    assert wire.decode_request(wire.encode_request(params)).request == params


def test_the_wire_inputs_are_the_request_fields():
    fields = {f for f in ImageRequest.__struct_fields__} - {"model"}
    assert {s.name for s in wire.INPUTS} == fields


def test_raw_input_contents_decode_like_typed_contents():
    typed = wire.decode_request(infer_request(prompt="a cat", width=64, seed=3, guidance_scale=2.5))
    raw = wire.decode_request(raw_infer_request(prompt="a cat", width=64, seed=3, guidance_scale=2.5))
    assert typed == raw and typed.request.width == 64


def test_settings_may_be_request_parameters():
    req = infer_request(prompt="a cat")
    req.parameters["steps"].int64_param = 9
    req.parameters["sampler"].string_param = "euler_a"
    req.parameters["guidance_scale"].double_param = 3.0
    req.parameters["priority"].int64_param = 1  # another server's parameter: ignored
    got = wire.decode_request(req).request
    assert (got.steps, got.sampler, got.guidance_scale) == (9, "euler_a", 3.0)


@pytest.mark.parametrize(
    "request_, param",
    [
        (infer_request(prompt="a", colour="red"), "colour"),  # unknown input
        (infer_request(width=64), "prompt"),  # prompt missing
        (infer_request(prompt="a", width=64.0), "width"),  # float for an integer
        (infer_request(model="", prompt="a"), "model"),
    ],
)
def test_bad_requests_name_the_input(request_, param):
    with pytest.raises(E.InvalidRequestError) as info:
        wire.decode_request(request_)
    assert info.value.param == param


def test_an_input_must_hold_one_element():
    req = infer_request(prompt="a")
    req.inputs.add(name="seed", datatype="INT64", shape=[2]).contents.int64_contents.extend([1, 2])
    with pytest.raises(E.InvalidRequestError, match="exactly one element") as info:
        wire.decode_request(req)
    assert info.value.param == "seed"


def test_the_same_setting_twice_is_refused():
    req = infer_request(prompt="a", steps=3)
    req.parameters["steps"].int64_param = 4
    with pytest.raises(E.InvalidRequestError) as info:
        wire.decode_request(req)
    assert info.value.param == "steps"


def test_results_and_progress_round_trip():
    resp = wire.encode_result("m", "id", [b"png0", b"png1"], [5, 6], 7, 1.25)
    result = wire.decode_result(resp, "host:1")
    assert (result.images_png, result.seeds, result.prompt_tokens, result.worker) == ([b"png0", b"png1"], [5, 6], 7, "host:1")
    assert result.engine_seconds == 1.25
    assert wire.event_of(resp) == "result"
    only = wire.encode_result("m", "id", [b"png"], [5], 7, 1.0, outputs=("seeds",))
    assert [t.name for t in only.outputs] == ["seeds"]
    from engine.client.types import Progress

    msg = wire.encode_progress("m", "id", Progress(image_index=1, step=3, total_steps=9, preview_jpeg=b"jpg"))
    assert wire.event_of(msg.infer_response) == "progress"
    assert wire.decode_progress(msg.infer_response) == Progress(1, 3, 9, b"jpg")


@pytest.mark.parametrize(
    "error, code",
    [
        (E.InvalidRequestError("steps must be between 1 and 150, got 0", param="steps"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.UnknownSamplerError("unknown sampler 'x'", param="sampler"), grpc.StatusCode.INVALID_ARGUMENT),
        (E.ModelNotFoundError("no model 'x'", param="model"), grpc.StatusCode.NOT_FOUND),
        (E.QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (E.WorkerUnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
        (E.DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (E.RequestCancelledError("cancelled"), grpc.StatusCode.CANCELLED),
        (E.NonFiniteOutputError("NaN"), grpc.StatusCode.INTERNAL),
        (E.EngineError("onnxruntime failed"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_has_one_status_and_comes_back_as_itself(error, code):
    got_code, details, trailing = to_status(error)
    assert got_code == code
    back = from_status(got_code, details, dict(trailing))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert getattr(back, "param", None) == getattr(error, "param", None)
    if getattr(error, "param", None):
        assert error.param in details


def test_an_unexpected_exception_is_internal():
    code, details, trailing = to_status(RuntimeError("boom"))
    assert code == grpc.StatusCode.INTERNAL and "boom" in details
    assert isinstance(from_status(code, details, dict(trailing)), E.EngineError)


def test_a_status_from_the_transport_means_try_another_worker():
    assert from_status(grpc.StatusCode.UNAVAILABLE, "Connection reset by peer", {}) is None
    assert isinstance(from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", {}), E.DeadlineExceededError)


def test_metadata_lists_every_input_and_output():
    limits = ModelLimits(name="m", family="sd1", max_batch=4, max_n=3, max_steps=60, samplers=("ddim", "euler"), edits=True)
    meta = wire.encode_model_metadata(limits, "v", "p")
    assert [t.name for t in meta.inputs] == [s.name for s in wire.INPUTS]
    assert [t.name for t in meta.outputs] == ["images", "seeds", "prompt_tokens"]
    assert wire.decode_model_metadata(meta) == limits  # every limit reaches the front end
    assert isinstance(meta, pb.ModelMetadataResponse)


def test_the_client_imports_neither_onnxruntime_nor_torch():
    code = (
        "import sys, engine.client.pool, engine.client.local, engine.client.types; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
