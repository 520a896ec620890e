"""Routes for operators: /health (alive), /ready (a worker is ready), /metrics (Prometheus)."""

from __future__ import annotations

import logging

from litestar import Response, get
from litestar.di import NamedDependency

from engine.errors import WorkerUnavailableError
from server.engine_port import EnginePort
from server.images_store import ImageStore
from server.metrics import CONTENT_TYPE, Metrics
from server.openapi_docs import error_spec
from server.protocol import Status

log = logging.getLogger("kiln.server")


@get("/health", summary="The process is alive", tags=["operations"])
async def health() -> Status:
    return Status(status="ok")


@get("/ready", summary="At least one worker is ready", responses={503: error_spec("No worker ready")}, tags=["operations"])
async def ready(engine: NamedDependency[EnginePort]) -> Status:
    if not await engine.ready():
        raise WorkerUnavailableError("no engine worker is ready")
    return Status(status="ready")


@get("/metrics", summary="Prometheus metrics (text format)", media_type=CONTENT_TYPE, tags=["operations"])
async def metrics(metrics: NamedDependency[Metrics], engine: NamedDependency[EnginePort], store: NamedDependency[ImageStore]) -> Response:
    metrics.workers_ready.set(1.0 if await engine.ready() else 0.0)
    metrics.stored_images.set(store.count())  # an in-memory count: no thread hop
    workers = None
    worker_metrics = getattr(engine, "metrics", None)  # WorkerPool has it; the port does not require it
    if worker_metrics is not None:
        try:
            workers = await worker_metrics()
        except Exception as e:  # a scrape must not fail because a worker is down
            log.info("worker metrics unavailable: %s", e)
    return Response(metrics.render(workers), media_type=CONTENT_TYPE)
