"""Model names clients may send (local names and aliases) and what the workers report about them."""

from __future__ import annotations

import logging
import time

from engine.client.types import ModelLimits
from engine.errors import WorkerUnavailableError
from server.config import Config, ModelConfig
from server.engine_port import EnginePort
from server.errors import ModelNotFoundError
from server.protocol import Model, ModelList

log = logging.getLogger("kiln.server.models")


class ResolvedModel:
    """A request's model: the name it used, the configured entry, and the limits to enforce: the
    workers' own (ModelMetadata), lowered where this front end's configuration says less."""

    __slots__ = ("requested", "config", "limits")

    def __init__(self, requested: str, config: ModelConfig, limits: ModelLimits):
        self.requested, self.config, self.limits = requested, config, limits


class ModelRegistry:
    def __init__(self, config: Config, engine: EnginePort):
        self._engine = engine
        self._models = list(config.models)
        self._by_name: dict[str, ModelConfig] = {}
        for m in config.models:
            for name in (m.name, *m.aliases):
                self._by_name[name] = m
        self._info: dict[str, ModelLimits] = {}
        self._caps = config.limits
        self._created = int(time.time())

    def names(self) -> list[str]:
        return list(self._by_name)

    def lookup(self, name: str) -> ModelConfig:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name)
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it (this server has: {known}).",
                param="model",
            ) from None

    async def refresh(self) -> None:
        """Ask the workers which models they serve, and with which limits."""
        self._info = {info.name: info for info in await self._engine.models()}
        missing = [m.worker_model for m in self._models if m.worker_model not in self._info]
        if missing:
            log.warning("no ready worker serves %s yet", ", ".join(sorted(missing)))

    async def resolve(self, name: str) -> ResolvedModel:
        config = self.lookup(name)
        if config.worker_model not in self._info:
            await self.refresh()
        info = self._info.get(config.worker_model)
        if info is None:
            raise WorkerUnavailableError(f"no ready worker serves model '{name}' ({config.worker_model}) right now")
        caps = self._caps
        limits = info.capped(
            max_n=caps.max_n, max_steps=caps.max_steps, max_prompt_chars=caps.max_prompt_chars, max_side=config.max_side
        )
        return ResolvedModel(name, config, limits)

    def listing(self) -> ModelList:
        return ModelList(data=[Model(id=name, created=self._created) for name in self._by_name])

    def get(self, name: str) -> Model:
        self.lookup(name)
        return Model(id=name, created=self._created)
