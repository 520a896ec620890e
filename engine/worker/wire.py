"""What a Kiln model's v2 inference request and response carry: the wire format, both directions.

The worker decodes requests and encodes responses with this module, the client (engine.client)
does the reverse; neither side spells a tensor name anywhere else. Pure protobuf: no numpy, no
onnxruntime.

Inputs of `ModelInfer` / `ModelInferStream` (model_name = the package's name). Every input is
one element (shape [1]). Each may instead be sent as a request parameter of the same name
(`ModelInferRequest.parameters`), which is handier for generic clients; giving both is an error.

| name             | datatype            | default                    | meaning                                |
|------------------|---------------------|----------------------------|----------------------------------------|
| prompt           | BYTES (UTF-8)       | required                   | what to draw                           |
| negative_prompt  | BYTES (UTF-8)       | ""                         | what to steer away from                |
| width, height    | INT64 (any INT/UINT)| the package's default size | pixels, within the package's limits    |
| seed             | INT64               | random (returned in seeds) | image k uses seed + k                  |
| n                | INT64               | 1                          | images, 1..max_n (ModelMetadata)       |
| steps            | INT64               | the package's default      | denoising steps                        |
| guidance_scale   | FP32 (FP64, INT)    | the package's default      | classifier-free guidance; <= 1: none   |
| guidance_rescale | FP32 (FP64, INT)    | the package's default      | 0..1                                   |
| sampler          | BYTES               | the package's default      | euler, euler_a, ddim, dpmpp_2m_karras, lcm |
| preview_every    | INT64               | 0                          | stream only: a JPEG preview every k steps |
| image            | BYTES (PNG/JPEG/WebP)| none: text-to-image       | the picture to edit (img2img)          |
| mask             | BYTES (PNG)         | none                       | with image: inpaint; transparent (alpha) or white = repaint |
| strength         | FP32                | the model's default_strength | edits: share of the schedule re-run, (0, 1] |
| loras            | BYTES (JSON)        | none                       | `[{"name": "style", "scale": 0.8}]`: LoRAs stored with the model (ModelMetadata `loras`); also `<lora:style:0.8>` in the prompt |

The inputs are the fields of `engine.request.ImageRequest` (but `model`, which is model_name):
this table and that type cannot disagree, because the specs below are derived from the type.

Tensor data may be in `contents` (typed fields) or in `raw_input_contents` (little-endian; BYTES
elements 4-byte length-prefixed), as the specification allows.

Outputs (in `contents`; request a subset with `outputs`, by default all):

| name          | datatype | shape | meaning                                             |
|---------------|----------|-------|-----------------------------------------------------|
| images        | BYTES    | [n]   | PNG files, in seed order                            |
| seeds         | INT64    | [n]   | the seed of each image                              |
| prompt_tokens | INT64    | [1]   | the prompt's tokens by the model's own tokenizer    |

Response parameters: `engine_seconds` (double: time in the worker, queueing included).

`ModelInferStream` (Kiln's extension) sends `ModelStreamInferResponse`s whose `infer_response`
has parameter `kiln_event`: "progress" messages carry `image_index`, `step`, `total_steps` (int64)
and, every `preview_every` steps, an output `preview` (BYTES [1], a small JPEG); the last message is
"result", the ModelInfer response.

`ModelMetadataResponse.parameters` (Kiln's extension): every field of `engine.request.ModelLimits`
(family, default_size "WxH", min_side, max_side, multiple_of, default_steps, default_sampler,
default_guidance_scale, default_strength, samplers (comma-separated), max_steps, max_n, max_batch,
max_prompt_chars, edits, inpainting_unet, loras (comma-separated names)): the limits the front end
enforces are the worker's.
"""

from __future__ import annotations

import struct
import typing
from typing import Any

import msgspec

from engine.client.types import GenerationResult, Progress
from engine.errors import InvalidRequestError
from engine.request import ImageRequest, ModelLimits
from engine.worker import inference_pb2 as pb

EVENT = "kiln_event"
BYTES_FIELDS = {"image", "mask"}  # raw bytes, not UTF-8 text


class InputSpec(msgspec.Struct, frozen=True):
    name: str
    datatype: str  # what Kiln sends and ModelMetadata lists
    kind: type  # str | bytes | int | float | tuple: what the worker accepts it as
    structure: Any = None  # kind tuple: the field's type, sent as JSON text


def _input_specs() -> tuple[InputSpec, ...]:
    """One input per ImageRequest field (model travels as model_name); a field holding
    structures (loras) travels as JSON text."""
    specs = []
    for field in msgspec.structs.fields(ImageRequest):
        if field.name == "model":
            continue
        if typing.get_origin(field.type) is tuple:
            specs.append(InputSpec(field.name, "BYTES", tuple, field.type))
            continue
        kind = next(t for t in (bytes, str, float, int) if t is field.type or t in typing.get_args(field.type))
        datatype = {bytes: "BYTES", str: "BYTES", float: "FP32", int: "INT64"}[kind]
        specs.append(InputSpec(field.name, datatype, kind))
    return tuple(specs)


INPUTS: tuple[InputSpec, ...] = _input_specs()
BY_NAME = {spec.name: spec for spec in INPUTS}
OUTPUTS: tuple[tuple[str, str, int], ...] = (("images", "BYTES", -1), ("seeds", "INT64", -1), ("prompt_tokens", "INT64", 1))

INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}
RAW_FORMATS = {
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "FP16": "e", "FP32": "f", "FP64": "d", "BOOL": "?",
}  # fmt: skip


class DecodedRequest(msgspec.Struct, frozen=True):
    """A ModelInfer request as the worker reads it: the ImageRequest plus the call's own fields."""

    request: ImageRequest
    id: str = ""
    outputs: tuple[str, ...] = ()  # empty: all


# ---- request: client side ----------------------------------------------------------------


def _tensor(name: str, value: Any) -> pb.ModelInferRequest.InferInputTensor:
    spec = BY_NAME[name]
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=spec.datatype, shape=[1])
    if spec.kind is bytes:
        t.contents.bytes_contents.append(bytes(value))
    elif spec.kind is str:
        t.contents.bytes_contents.append(value.encode("utf-8"))
    elif spec.kind is tuple:
        t.contents.bytes_contents.append(msgspec.json.encode(value))
    elif spec.kind is int:
        t.contents.int64_contents.append(int(value))
    else:
        t.contents.fp32_contents.append(float(value))
    return t


def encode_request(req: ImageRequest, request_id: str = "") -> pb.ModelInferRequest:
    """ImageRequest -> ModelInferRequest with every field that is set as a named input."""
    defaults = {f.name: f.default for f in msgspec.structs.fields(ImageRequest)}
    inputs = []
    for spec in INPUTS:
        value = getattr(req, spec.name)
        if value is None or (spec.name != "prompt" and value == defaults[spec.name]):
            continue
        inputs.append(_tensor(spec.name, value))
    return pb.ModelInferRequest(model_name=req.model, id=request_id, inputs=inputs)


# ---- request: worker side ----------------------------------------------------------------


def _raw_values(raw: bytes, datatype: str, name: str) -> list:
    if datatype == "BYTES":
        out, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidRequestError(f"input {name}: raw BYTES data is truncated", param=name)
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise InvalidRequestError(f"input {name}: raw BYTES element runs past the data", param=name)
            out.append(raw[pos : pos + length])
            pos += length
        return out
    fmt = RAW_FORMATS.get(datatype)
    if fmt is None:
        raise InvalidRequestError(f"input {name}: unsupported datatype {datatype}", param=name)
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise InvalidRequestError(f"input {name}: {len(raw)} raw bytes is not a whole number of {datatype}", param=name)
    return [v[0] for v in struct.iter_unpack("<" + fmt, raw)]


def _typed_values(contents: pb.InferTensorContents, datatype: str) -> list:
    if datatype == "BYTES":
        return list(contents.bytes_contents)
    if datatype in ("INT8", "INT16", "INT32"):
        return list(contents.int_contents)
    if datatype == "INT64":
        return list(contents.int64_contents)
    if datatype in ("UINT8", "UINT16", "UINT32"):
        return list(contents.uint_contents)
    if datatype == "UINT64":
        return list(contents.uint64_contents)
    if datatype in ("FP16", "FP32"):
        return list(contents.fp32_contents)
    if datatype == "FP64":
        return list(contents.fp64_contents)
    if datatype == "BOOL":
        return list(contents.bool_contents)
    return []


def _structure(spec: InputSpec, text: bytes | str) -> Any:
    """A JSON input (loras) as its ImageRequest type; the error names what is wrong in it."""
    try:
        return msgspec.json.decode(text, type=spec.structure)
    except msgspec.ValidationError as e:
        raise InvalidRequestError(f"input {spec.name}: {e} (expected a JSON list like [{{\"name\": \"style\", \"scale\": 0.8}}])", param=spec.name) from None
    except msgspec.DecodeError:
        raise InvalidRequestError(f"input {spec.name} is not JSON: send [{{\"name\": \"style\", \"scale\": 0.8}}]", param=spec.name) from None


def _convert(spec: InputSpec, datatype: str, value: Any) -> Any:
    name = spec.name
    if spec.kind is tuple:
        if datatype != "BYTES":
            raise InvalidRequestError(f"input {name} must be BYTES (JSON text), got {datatype}", param=name)
        return _structure(spec, bytes(value))
    if spec.kind is bytes:
        if datatype != "BYTES":
            raise InvalidRequestError(f"input {name} must be BYTES (the encoded file), got {datatype}", param=name)
        return bytes(value)
    if spec.kind is str:
        if datatype != "BYTES":
            raise InvalidRequestError(f"input {name} must be BYTES (UTF-8 text), got {datatype}", param=name)
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"input {name} is not valid UTF-8", param=name) from None
    if spec.kind is int:
        if datatype not in INT_TYPES:
            raise InvalidRequestError(f"input {name} must be an integer tensor (INT64), got {datatype}", param=name)
        return int(value)
    if datatype not in FLOAT_TYPES | INT_TYPES:
        raise InvalidRequestError(f"input {name} must be a number (FP32), got {datatype}", param=name)
    return float(value)


def _parameter(spec: InputSpec, p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    value = getattr(p, choice) if choice else None
    name = spec.name
    if spec.kind is bytes:
        raise InvalidRequestError(f"{name} cannot be a request parameter: send it as a BYTES input", param=name)
    if spec.kind is str and choice == "string_param":
        return value
    if spec.kind is tuple and choice == "string_param":
        return _structure(spec, value)
    if spec.kind is int and choice in ("int64_param", "uint64_param"):
        return int(value)
    if spec.kind is float and choice in ("double_param", "int64_param", "uint64_param"):
        return float(value)
    wanted = {str: "string_param", tuple: "string_param", int: "int64_param", float: "double_param"}[spec.kind]
    raise InvalidRequestError(f"parameter {name} must be a {wanted}, got {choice or 'nothing'}", param=name)


def decode_request(req: pb.ModelInferRequest) -> DecodedRequest:
    """ModelInferRequest -> DecodedRequest; raises InvalidRequestError naming the input at fault.
    Only the wire's shape is checked here; values are checked by `validate_request` (one place)."""
    if not req.model_name:
        raise InvalidRequestError("model_name is empty: name the model (see RepositoryIndex)", param="model")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(req.raw_input_contents)} entries for {len(req.inputs)} inputs", param="inputs"
        )
    values: dict[str, Any] = {}
    for i, t in enumerate(req.inputs):
        spec = BY_NAME.get(t.name)
        if spec is None:
            raise InvalidRequestError(
                f"unknown input {t.name!r}; inputs are {', '.join(BY_NAME)}", param=t.name or "inputs"
            )
        if t.name in values:
            raise InvalidRequestError(f"input {t.name} is given twice", param=t.name)
        datatype = t.datatype.upper()
        items = _raw_values(req.raw_input_contents[i], datatype, t.name) if req.raw_input_contents else _typed_values(t.contents, datatype)
        count = 1
        for d in t.shape:
            count *= d
        if len(items) != 1 or (t.shape and count != 1):
            raise InvalidRequestError(
                f"input {t.name} must hold exactly one element (shape [1]); got shape {list(t.shape)} "
                f"with {len(items)} values",
                param=t.name,
            )
        values[t.name] = _convert(spec, datatype, items[0])
    for name, p in req.parameters.items():
        spec = BY_NAME.get(name)
        if spec is None:
            continue  # other servers' parameters (priority, timeout, binary_data_output...) are ignored
        if name in values:
            raise InvalidRequestError(f"{name} is given both as an input and as a parameter", param=name)
        values[name] = _parameter(spec, p)
    if "prompt" not in values:
        raise InvalidRequestError("input prompt is missing: describe the image to generate", param="prompt")
    known = {name for name, _, _ in OUTPUTS}
    outputs = tuple(o.name for o in req.outputs)
    for name in outputs:
        if name not in known:
            raise InvalidRequestError(f"unknown output {name!r}; outputs are {', '.join(sorted(known))}", param="outputs")
    return DecodedRequest(ImageRequest(model=req.model_name, **values), id=req.id, outputs=outputs)


# ---- response: worker side ---------------------------------------------------------------


def _param(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def encode_result(
    model: str,
    request_id: str,
    images_png: list[bytes],
    seeds: list[int],
    prompt_tokens: int,
    engine_seconds: float,
    outputs: tuple[str, ...] = (),
    event: str | None = None,
) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=model, id=request_id)
    resp.parameters["engine_seconds"].CopyFrom(_param(float(engine_seconds)))
    if event:
        resp.parameters[EVENT].CopyFrom(_param(event))
    wanted = set(outputs) or {name for name, _, _ in OUTPUTS}
    Out = pb.ModelInferResponse.InferOutputTensor
    if "images" in wanted:
        t = Out(name="images", datatype="BYTES", shape=[len(images_png)])
        t.contents.bytes_contents.extend(images_png)
        resp.outputs.append(t)
    if "seeds" in wanted:
        t = Out(name="seeds", datatype="INT64", shape=[len(seeds)])
        t.contents.int64_contents.extend(seeds)
        resp.outputs.append(t)
    if "prompt_tokens" in wanted:
        t = Out(name="prompt_tokens", datatype="INT64", shape=[1])
        t.contents.int64_contents.append(prompt_tokens)
        resp.outputs.append(t)
    return resp


def encode_progress(model: str, request_id: str, progress: Progress) -> pb.ModelStreamInferResponse:
    resp = pb.ModelInferResponse(model_name=model, id=request_id)
    for key, value in (
        (EVENT, "progress"),
        ("image_index", progress.image_index),
        ("step", progress.step),
        ("total_steps", progress.total_steps),
    ):
        resp.parameters[key].CopyFrom(_param(value))
    if progress.preview_jpeg is not None:
        t = pb.ModelInferResponse.InferOutputTensor(name="preview", datatype="BYTES", shape=[1])
        t.contents.bytes_contents.append(progress.preview_jpeg)
        resp.outputs.append(t)
    return pb.ModelStreamInferResponse(infer_response=resp)


# ---- response: client side ---------------------------------------------------------------


def _param_value(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return getattr(p, choice) if choice else None


def _outputs(resp: pb.ModelInferResponse) -> dict[str, list]:
    found = {}
    for i, t in enumerate(resp.outputs):
        if i < len(resp.raw_output_contents):
            found[t.name] = _raw_values(resp.raw_output_contents[i], t.datatype, t.name)
        else:
            found[t.name] = _typed_values(t.contents, t.datatype)
    return found


def event_of(resp: pb.ModelInferResponse) -> str:
    return _param_value(resp.parameters[EVENT]) if EVENT in resp.parameters else "result"


def decode_progress(resp: pb.ModelInferResponse) -> Progress:
    p = {k: _param_value(v) for k, v in resp.parameters.items()}
    preview = _outputs(resp).get("preview")
    return Progress(
        image_index=int(p["image_index"]),
        step=int(p["step"]),
        total_steps=int(p["total_steps"]),
        preview_jpeg=bytes(preview[0]) if preview else None,
    )


def decode_result(resp: pb.ModelInferResponse, worker: str) -> GenerationResult:
    out = _outputs(resp)
    seconds = resp.parameters["engine_seconds"] if "engine_seconds" in resp.parameters else None
    return GenerationResult(
        images_png=[bytes(b) for b in out.get("images", [])],
        seeds=[int(s) for s in out.get("seeds", [])],
        prompt_tokens=int(out.get("prompt_tokens", [0])[0]),
        worker=worker,
        engine_seconds=float(_param_value(seconds)) if seconds is not None else 0.0,
    )


# ---- model metadata ----------------------------------------------------------------------


def encode_model_metadata(limits: ModelLimits, version: str, platform: str) -> pb.ModelMetadataResponse:
    Meta = pb.ModelMetadataResponse.TensorMetadata
    resp = pb.ModelMetadataResponse(
        name=limits.name,
        versions=[version],
        platform=platform,
        inputs=[Meta(name=s.name, datatype=s.datatype, shape=[1]) for s in INPUTS],
        outputs=[Meta(name=n, datatype=d, shape=[s]) for n, d, s in OUTPUTS],
    )
    for key, value in msgspec.structs.asdict(limits).items():
        if key == "name":
            continue
        resp.parameters[key].CopyFrom(_param(",".join(value) if isinstance(value, tuple) else value))
    return resp


def decode_model_metadata(resp: pb.ModelMetadataResponse) -> ModelLimits:
    """The worker's limits; parameters another server version does not send keep their defaults."""
    known = {f.name: f for f in msgspec.structs.fields(ModelLimits)}
    values: dict[str, Any] = {"name": resp.name}
    for key, p in resp.parameters.items():
        field = known.get(key)
        if field is None or key == "name":
            continue
        value = _param_value(p)
        if field.type == tuple[str, ...]:
            value = tuple(v for v in str(value).split(",") if v)
        values[key] = value
    return msgspec.convert(values, ModelLimits, strict=False)
