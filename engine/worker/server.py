"""The worker's gRPC server: the v2 inference service over a Scheduler, health, and draining.

Life of a worker (`run_worker`):
  live at once (ServerLive answers while loading) -> packages loaded -> warm-up at the largest
  configured batch and size -> ready -> ... -> SIGTERM/SIGINT: not ready, new requests refused
  with UNAVAILABLE, accepted requests finish (bounded by the drain timeout; what is left then is
  failed with UNAVAILABLE so clients retry elsewhere) -> exit 0.
A warm-up failure (out of memory, say) is a start-up error naming the setting to lower.
The standard grpc.health.v1 service follows the same states (engine/worker/health.py). With a
token every other RPC requires it; with TLS the port speaks only TLS (engine/worker/auth.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import grpc

from engine.client.types import Progress
from engine.errors import (
    InvalidRequestError,
    KilnError,
    ModelNotFoundError,
    PackageError,
    WorkerUnavailableError,
)
from engine.pipeline import Pipeline
from engine.request import MAX_N, ModelLimits
from engine.sessions import RuntimeOptions
from engine.shapes import parse_size
from engine.worker import inference_pb2 as pb
from engine.worker import inference_pb2_grpc as pb_grpc
from engine.worker import wire
from engine.worker.auth import ServerTLS, TokenInterceptor
from engine.worker.health import Health
from engine.worker.scheduler import Event, Job, JobFailed, JobResult, Scheduler
from engine.worker.status import to_status

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 2**20  # n large PNGs fit in one response
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),  # a second worker on a taken port must fail, not share it
    ("grpc.keepalive_permit_without_calls", 1),  # clients ping to notice a dead worker
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
]
EXTENSIONS = ["model_repository_index", "kiln_stream_infer", "kiln_worker_metrics"]


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process is told at start-up (built and checked by engine.worker.main)."""

    packages: tuple[Path, ...]
    listen: str = "127.0.0.1:50051"
    max_batch: int = 8
    max_queue: int = 64
    batching: bool = True
    warmup_sizes: tuple[tuple[int, int], ...] = ()  # empty: each package's default size
    threads: int = 0  # onnxruntime intra-op threads; 0: its default
    drain_timeout: float = 30.0
    session_cache: int | None = None  # fixed-shape sessions per component beyond warm-up; None: RuntimeOptions' default
    ready_file: Path | None = None  # written with "host:port" once ready (LocalWorkers waits on it)
    token: str | None = field(default=None, repr=False)  # every RPC but health must carry it; a secret
    tls: ServerTLS | None = None  # None: plaintext


class StartupError(KilnError):
    """The worker cannot start; the message names the setting to change."""


def _version() -> str:
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.pipelines: dict[str, Pipeline] = {}
        self.scheduler: Scheduler | None = None
        self.ready = False
        self.draining = False

    # ---- health and metadata -------------------------------------------------------------

    def _serving(self) -> bool:
        return self.ready and not self.draining

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._serving())

    async def ModelReady(self, request, context):
        pipe = self.pipelines.get(request.name)
        ok = pipe is not None and request.version in ("", self._model_version(pipe))
        return pb.ModelReadyResponse(ready=self._serving() and ok)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="kiln", version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            pipe = self._pipeline(request.name, request.version)
        except KilnError as e:
            await self._abort(context, e)
        return wire.encode_model_metadata(self._limits(pipe), self._model_version(pipe), "kiln_diffusion_onnx")

    def _limits(self, pipe: Pipeline) -> ModelLimits:
        """What this worker accepts for a model: the only source of the limits clients see."""
        return pipe.limits(max_n=min(MAX_N, self.config.max_queue), max_batch=self.config.max_batch)

    async def RepositoryIndex(self, request, context):
        Index = pb.RepositoryIndexResponse.ModelIndex
        state = "READY" if self._serving() else ("UNAVAILABLE" if self.draining else "LOADING")
        models = [Index(name=name, version=self._model_version(p), state=state) for name, p in self.pipelines.items()]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def WorkerMetrics(self, request, context):
        counters, gauges = self.scheduler.metrics() if self.scheduler else ({}, {})
        gauges = {**gauges, "ready": float(self._serving()), "draining": float(self.draining)}
        return pb.WorkerMetricsResponse(counters=counters, gauges=gauges)

    @staticmethod
    def _model_version(pipe: Pipeline) -> str:
        return pipe.manifest.source_digest[:12]

    def _pipeline(self, name: str, version: str = "") -> Pipeline:
        pipe = self.pipelines.get(name)
        if pipe is None:
            served = ", ".join(sorted(self.pipelines)) or "none yet (loading)"
            raise ModelNotFoundError(f"this worker has no model {name!r}; it serves: {served}", param="model")
        if version not in ("", self._model_version(pipe)):
            raise ModelNotFoundError(
                f"model {name!r} is at version {self._model_version(pipe)}, not {version!r}", param="model_version"
            )
        return pipe

    # ---- inference -----------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        job, events = await self._submit(request, context, progress=False)
        try:
            while True:
                event = await events.get()
                if isinstance(event, JobResult):
                    return self._result(job, request, event)
                if isinstance(event, JobFailed):
                    await self._abort(context, event.error)
        finally:
            self._let_go(job)

    async def ModelInferStream(self, request, context):
        job, events = await self._submit(request, context, progress=True)
        try:
            while True:
                event = await events.get()
                if isinstance(event, Progress):
                    yield wire.encode_progress(request.model_name, request.id, event)
                elif isinstance(event, JobResult):
                    yield pb.ModelStreamInferResponse(infer_response=self._result(job, request, event, "result"))
                    return
                else:
                    await self._abort(context, event.error)
        finally:
            self._let_go(job)

    def _result(self, job: Job, request, event: JobResult, kind: str | None = None):
        return wire.encode_result(
            request.model_name,
            request.id,
            event.images_png,
            event.seeds,
            event.prompt_tokens,
            event.engine_seconds,
            outputs=tuple(o.name for o in request.outputs),
            event=kind,
        )

    def _let_go(self, job: Job) -> None:
        """The call ended (answered, failed, cancelled by the client or its deadline): free its work."""
        if not job.finished and self.scheduler is not None:
            expired = job.deadline is not None and time.monotonic() >= job.deadline - 0.05
            self.scheduler.cancel(job, expired=expired)

    async def _submit(self, request, context, progress: bool) -> tuple[Job, asyncio.Queue[Event]]:
        try:
            if not self._serving() or self.scheduler is None:
                why = "is draining" if self.draining else "is still loading its models"
                raise WorkerUnavailableError(f"the worker {why}; use another worker or retry shortly")
            decoded = wire.decode_request(request)
            pipe = self._pipeline(decoded.request.model, request.model_version)
            req = pipe.resolve(decoded.request, self._limits(pipe))  # defaults filled, every value checked
            remaining = context.time_remaining()
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()

            def sink(event: Event) -> None:
                loop.call_soon_threadsafe(events.put_nowait, event)

            job = Job(
                model=req.model,
                request=req,
                key=self.scheduler.key_for(req.model, req.width, req.height, req),
                prompt_tokens=pipe.tokenizers[0].count(req.prompt),
                sink=sink,
                deadline=time.monotonic() + remaining if remaining is not None else None,
                progress=progress,
                preview_every=req.preview_every,
            )
            self.scheduler.submit(job)  # refuses at once when the queue is full
        except KilnError as e:
            await self._abort(context, e)
        except Exception as e:  # a bug: this request's INTERNAL (with Kiln's metadata), not a dead worker
            log.exception("request %s failed before it was queued", request.id or "-")
            await self._abort(context, e)
        return job, events

    @staticmethod
    async def _abort(context, error: BaseException) -> None:
        code, details, trailing = to_status(error)
        log.info("request refused: %s %s", code.name, details)
        await context.abort(code, details, trailing_metadata=trailing)


# ---- process life cycle ------------------------------------------------------------------


def load_and_warm_up(config: WorkerConfig) -> tuple[dict[str, Pipeline], Scheduler]:
    """Load every package and warm each up at max_batch x each warm-up size. Raises StartupError."""
    pipelines: dict[str, Pipeline] = {}
    for path in config.packages:
        try:
            sessions = {"max_sessions": config.session_cache} if config.session_cache else {}  # None: KILN_MAX_SESSIONS or 4
            pipe = Pipeline(path, RuntimeOptions(threads=config.threads, **sessions))
        except KilnError as e:
            raise StartupError(f"cannot load --package {path}: {e}") from None
        name = pipe.manifest.name
        if name in pipelines:
            raise StartupError(f"--package {path} and --package {pipelines[name].package} are both named {name!r}")
        pipelines[name] = pipe
        log.info("loaded %s (%s, %s) from %s", name, pipe.manifest.family, pipe.manifest.target, path)
    scheduler = Scheduler(pipelines, config.max_batch, config.max_queue, config.batching)
    for name, pipe in pipelines.items():
        sizes = config.warmup_sizes or (parse_size(pipe.manifest.sizes.default),)
        for width, height in sizes:
            start = time.perf_counter()
            try:
                scheduler.warm_up(name, width, height, config.max_batch)
            except InvalidRequestError as e:
                raise StartupError(f"--warmup-size {width}x{height} does not suit {name}: {e}") from None
            except Exception as e:  # out of memory, or any engine failure
                raise StartupError(
                    f"warm-up of {name} at batch {config.max_batch} and {width}x{height} failed ({type(e).__name__}: {e}); "
                    f"lower --max-batch (now {config.max_batch}) or --warmup-size (now {width}x{height})"
                ) from None
            log.info("warmed up %s at batch %d, %dx%d in %.1fs", name, config.max_batch, width, height, time.perf_counter() - start)
    return pipelines, scheduler


def _write_ready_file(path: Path, address: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


def _remove_ready_file(path: Path) -> None:
    """On a clean stop: the ready file goes, and so does the folder LocalWorkers made for ready
    files once the last of its workers has gone. That is what cleans up after a front end killed
    with SIGKILL: its workers get SIGTERM (parent-death signal), drain, and leave nothing behind."""
    from engine.client.local import FOLDER_PREFIX  # the client side's naming (no onnxruntime there)

    path.unlink(missing_ok=True)
    if path.parent.name.startswith(FOLDER_PREFIX):
        try:
            path.parent.rmdir()  # only when empty: the other workers' files keep it
        except OSError:
            pass


async def run_worker(config: WorkerConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain. 0 on a clean stop, 2 on a start-up error."""
    service = InferenceService(config)
    interceptors = [TokenInterceptor(config.token)] if config.token else []
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health = Health(server)
    await health.loading()
    host = config.listen.rsplit(":", 1)[0]
    try:
        if config.tls is not None:
            port = server.add_secure_port(config.listen, config.tls.credentials())
        else:
            port = server.add_insecure_port(config.listen)
    except RuntimeError as e:
        port, reason = 0, str(e)
    else:
        reason = "the port is taken or the address is not local"
    if not port:
        log.error("cannot listen on --listen %s: %s", config.listen, reason)
        return 2
    address = f"{host}:{port}"
    await server.start()
    log.info(
        "worker live on %s (%s, %s), loading %d package(s)",
        address,
        "plaintext" if config.tls is None else ("mutual TLS" if config.tls.client_ca else "TLS"),
        "token required" if config.token else "no token",
        len(config.packages),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        service.pipelines, service.scheduler = await asyncio.to_thread(load_and_warm_up, config)
    except (StartupError, PackageError) as e:
        log.error("%s", e)
        await server.stop(0)
        return 2
    service.scheduler.start()
    service.ready = True
    await health.serving()
    if config.ready_file:
        _write_ready_file(config.ready_file, address)
    log.info(
        "worker ready on %s: %s; max batch %d, queue %d images, batching %s",
        address,
        ", ".join(service.pipelines),
        config.max_batch,
        config.max_queue,
        "on" if config.batching else "off",
    )

    await stop.wait()
    log.info("draining: no new requests, finishing accepted ones (at most %.0fs)", config.drain_timeout)
    service.draining = True
    await health.draining()
    scheduler = service.scheduler
    scheduler.stop_accepting()
    if not await asyncio.to_thread(scheduler.wait_idle, config.drain_timeout):
        log.warning("drain timeout (%.0fs) passed: failing what is left with UNAVAILABLE", config.drain_timeout)
        scheduler.fail_all(WorkerUnavailableError("the worker shut down before the request finished; retry"))
    await server.stop(grace=5.0)  # lets the last answers reach their callers
    await asyncio.to_thread(scheduler.close)
    if config.ready_file:
        _remove_ready_file(config.ready_file)
    log.info("worker stopped")
    return 0
