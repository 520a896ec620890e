"""The Litestar application: routes, auth, the error table, OpenAPI, and the image cleaner.

`create_app(config, engine)` returns the ASGI app to serve (the Litestar app inside the request
observer). The engine is anything with the `EnginePort` methods -- `engine.client.pool.WorkerPool`
in production. The OpenAPI description is published at /schema/openapi.json.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme

import kiln
from server import chat, images, models, openapi_docs, ops, playground
from server.auth import ApiKeyGuard
from server.config import Config
from server.engine_port import EnginePort
from server.errors import make_exception_handler
from server.generation import Generator
from server.images_store import ImageStore
from server.metrics import Metrics
from server.models_registry import ModelRegistry
from server.observe import Observed
from server.shutdown import Drain
from server.serving_chat import ChatService
from server.serving_images import ImagesService

log = logging.getLogger("kiln.server")

OPENAPI_PATH = "/schema"


def create_app(config: Config, engine: EnginePort, *, close_engine: bool = False, metrics: Metrics | None = None) -> Observed:
    metrics = metrics or Metrics()
    drain = Drain(config.limits.drain_timeout, config.limits.retry_after_s)
    store = ImageStore(config.images.dir, config.images.ttl_minutes * 60.0, config.public_url, config.images.max_bytes, metrics)
    registry = ModelRegistry(config, engine)
    generator = Generator(config, engine, store, metrics, drain)
    chat_service = ChatService(registry, generator, metrics, store, default_shape=config.images.chat_answer)
    images_service = ImagesService(registry, generator, metrics, default_model=config.models[0].name)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        try:
            await registry.refresh()
        except Exception as e:  # workers may come later; requests refresh on demand
            log.warning("could not list the workers' models at start-up: %s: %s", type(e).__name__, e)
        cleaner = asyncio.create_task(_clean_forever(store, config.images.cleanup_interval_s))
        refresher = asyncio.create_task(registry.refresh_forever())
        try:
            yield
        finally:
            cleaner.cancel()
            refresher.cancel()
            if close_engine:
                await engine.close()

    def const(value):
        async def provide():
            return value

        return Provide(provide)

    app = Litestar(
        route_handlers=[
            chat.chat_completions,
            images.create_images,
            images.edit_images,
            images.image_variations,
            images.image_file,
            models.list_models,
            models.retrieve_model,
            ops.health,
            ops.ready,
            ops.metrics,
            *playground.route_handlers,
        ],
        dependencies={
            "chat": const(chat_service),
            "images": const(images_service),
            "registry": const(registry),
            "store": const(store),
            "metrics": const(metrics),
            "engine": const(engine),
        },
        guards=[ApiKeyGuard(config.auth.api_keys, config.server.open_paths)],
        exception_handlers={Exception: make_exception_handler(config.limits.retry_after_s)},
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Kiln",
            version=kiln.__version__ if hasattr(kiln, "__version__") else "0.1.0",
            description="OpenAI-compatible image generation: chat completions with image parts, and the Images API.",
            path=OPENAPI_PATH,
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
        ),
        lifespan=[lifespan],
        logging_config=None,
    )
    openapi_docs.finish(app.openapi_schema, config)  # the limits and shapes Litestar cannot see
    return Observed(app, metrics, drain, config.server.max_header_bytes)


async def _clean_forever(store: ImageStore, interval_s: float) -> None:
    while True:
        try:
            await anyio.to_thread.run_sync(store.clean)
        except OSError as e:
            log.warning("image cleaner: %s", e)
        await asyncio.sleep(interval_s)
