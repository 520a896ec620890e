"""Routes: GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from server.models_registry import ModelRegistry
from server.openapi_docs import error_spec
from server.protocol import Model, ModelList


@get("/v1/models", summary="The model names this server accepts (local names and aliases)", tags=["models"])
async def list_models(registry: NamedDependency[ModelRegistry]) -> ModelList:
    return registry.listing()


@get(
    "/v1/models/{model:str}",
    summary="One model",
    responses={404: error_spec("Unknown model")},
    tags=["models"],
)
async def retrieve_model(model: FromPath[str], registry: NamedDependency[ModelRegistry]) -> Model:
    return registry.get(model)
