"""Helpers for the worker tests: real worker processes, a generic v2 gRPC caller, pixel checks."""

from __future__ import annotations

import asyncio
import io
import struct
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from engine.client.local import LocalWorkers
from engine.worker import inference_pb2 as pb
from engine.worker.auth import call_metadata

SERVICE = "/inference.GRPCInferenceService/"
TOLERANCE = 2  # uint8 levels, the engine's parity tolerance
FAST = dict(max_batch=4, warmup_sizes=["64x64"], threads=1, drain_timeout=20.0)


def start_workers(package: Path | list[Path], count: int = 1, log_dir: Path | None = None, **options) -> LocalWorkers:
    packages = package if isinstance(package, list) else [package]
    workers = LocalWorkers(packages, count, log_dir=log_dir, **{**FAST, **options})
    workers.start(timeout=120)
    return workers


class V2:
    """A plain v2 client: method paths from the specification, messages built by hand. With a
    `token`, every call carries it as the worker token; with `credentials`, the channel is TLS."""

    def __init__(self, address: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None):
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.metadata = call_metadata(token)

    def __getattr__(self, method: str):
        name = "ModelStreamInferResponse" if method == "ModelInferStream" else f"{method}Response"
        response = getattr(pb, name)
        kind = self.channel.unary_stream if method == "ModelInferStream" else self.channel.unary_unary
        call = kind(SERVICE + method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response.FromString)
        return _WithMetadata(call, self.metadata) if self.metadata else call

    def close(self) -> None:
        self.channel.close()


class _WithMetadata:
    """A multi-callable that adds the worker token's metadata to every call."""

    def __init__(self, call, metadata: tuple[tuple[str, str], ...]):
        self._call, self._metadata = call, metadata

    def __call__(self, request, **kwargs):
        return self._call(request, metadata=self._metadata, **kwargs)

    def future(self, request, **kwargs):
        return self._call.future(request, metadata=self._metadata, **kwargs)


def tensor(name: str, value) -> pb.ModelInferRequest.InferInputTensor:
    t = pb.ModelInferRequest.InferInputTensor(name=name, shape=[1])
    if isinstance(value, str):
        t.datatype = "BYTES"
        t.contents.bytes_contents.append(value.encode())
    elif isinstance(value, int):
        t.datatype = "INT64"
        t.contents.int64_contents.append(value)
    else:
        t.datatype = "FP32"
        t.contents.fp32_contents.append(value)
    return t


def infer_request(model: str = "sd1", **values) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, inputs=[tensor(k, v) for k, v in values.items()])


def raw_infer_request(model: str = "sd1", **values) -> pb.ModelInferRequest:
    """The same request in raw_input_contents, as Triton's client library sends it."""
    req = pb.ModelInferRequest(model_name=model)
    for name, value in values.items():
        if isinstance(value, str):
            data = value.encode()
            req.inputs.add(name=name, datatype="BYTES", shape=[1])
            req.raw_input_contents.append(struct.pack("<I", len(data)) + data)
        elif isinstance(value, int):
            req.inputs.add(name=name, datatype="INT64", shape=[1])
            req.raw_input_contents.append(struct.pack("<q", value))
        else:
            req.inputs.add(name=name, datatype="FP32", shape=[1])
            req.raw_input_contents.append(struct.pack("<f", value))
    return req


def output(resp: pb.ModelInferResponse, name: str):
    for t in resp.outputs:
        if t.name == name:
            return t
    raise KeyError(name)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def metrics(address: str, token: str | None = None) -> dict[str, float]:
    v2 = V2(address, token)
    try:
        reply = v2.WorkerMetrics(pb.WorkerMetricsRequest(), timeout=5)
    finally:
        v2.close()
    return {**{k: float(v) for k, v in reply.counters.items()}, **dict(reply.gauges)}


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


async def await_until(predicate, timeout: float = 20.0, interval: float = 0.01) -> bool:
    """`wait_for` inside an event loop: `predicate` may be a coroutine function (a metric read
    over HTTP, say); the loop keeps running other tasks between polls."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        outcome = predicate()
        if await outcome if asyncio.iscoroutine(outcome) else outcome:
            return True
        await asyncio.sleep(interval)
    return False


def arun(coro):
    return asyncio.run(coro)
