"""Model names clients may send (local names and aliases) and what the workers report about them.

The workers are the one source of truth for a model's limits (ModelMetadata); the front end only
lowers them where its configuration says less. The registry asks them:
- at start-up and then every `workers.models_refresh_s` (a model whose package changed, or a
  worker that joined, is picked up without a restart);
- on demand when a request names a configured model no worker has listed yet; concurrent misses
  share one refresh (single flight), and a miss is remembered for NEGATIVE_TTL_S so a burst of
  requests for a model nobody serves does not become a burst of RPCs to every worker.
A model missing from an answer while some worker is down (being probed back by the pool) is kept:
it is most likely that worker's, and requests for it get the pool's 503 until the worker returns,
rather than a model that flickers in and out. Once every worker is up and none lists it, it goes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.client.types import ModelLimits
from engine.errors import WorkerUnavailableError
from server.config import Config, ModelConfig
from server.engine_port import EnginePort
from server.errors import ModelNotFoundError
from server.protocol import Model, ModelList

log = logging.getLogger("kiln.server.models")

NEGATIVE_TTL_S = 2.0  # a configured model no worker serves: ask again at most this often


class ResolvedModel:
    """A request's model: the name it used, the configured entry, and the limits to enforce: the
    workers' own (ModelMetadata), lowered where this front end's configuration says less."""

    __slots__ = ("requested", "config", "limits")

    def __init__(self, requested: str, config: ModelConfig, limits: ModelLimits):
        self.requested, self.config, self.limits = requested, config, limits


class ModelRegistry:
    def __init__(self, config: Config, engine: EnginePort, *, negative_ttl_s: float = NEGATIVE_TTL_S):
        self._engine = engine
        self._models = list(config.models)
        self._by_name: dict[str, ModelConfig] = {}
        for m in config.models:
            for name in (m.name, *m.aliases):
                self._by_name[name] = m
        self._info: dict[str, ModelLimits] = {}
        self._caps = config.limits
        self._created = int(time.time())
        self.refresh_interval_s = config.workers.models_refresh_s
        self.negative_ttl_s = negative_ttl_s
        self._missing_since: dict[str, float] = {}  # worker model -> when a refresh last lacked it
        self._failure: Exception | None = None  # why the last refresh failed, told again while remembered
        self._in_flight: asyncio.Task[None] | None = None
        self.refreshes = 0  # RPC rounds made: what single flight and the negative cache save

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
        """Ask the workers which models they serve, and with which limits. One round runs at a
        time, as its own task: callers that arrive meanwhile wait for it, and a caller that is
        cancelled (its client went away) does not cancel it for the others."""
        if self._in_flight is None or self._in_flight.done():
            self._in_flight = asyncio.get_running_loop().create_task(self._refresh_now())
            self._in_flight.add_done_callback(_retrieve)
        await asyncio.shield(self._in_flight)

    async def _refresh_now(self) -> None:
        self.refreshes += 1
        answered = {info.name: info for info in await self._engine.models()}
        someone_down = any(not w.up for w in self._engine.status())
        kept = {name: info for name, info in self._info.items() if name not in answered and someone_down}
        gone = [name for name in self._info if name not in answered and not someone_down]
        if gone:
            log.warning("no worker serves %s any more", ", ".join(sorted(gone)))
        self._info = {**kept, **answered}
        now = time.monotonic()
        self._missing_since = {m.worker_model: now for m in self._models if m.worker_model not in self._info}
        self._failure = None
        if self._missing_since:
            log.warning("no ready worker serves %s yet", ", ".join(sorted(self._missing_since)))

    async def refresh_forever(self) -> None:
        """The periodic refresh (a task of the app's lifespan); a failed round is logged, not fatal."""
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # our own cancellation (shutdown): stop
                    raise
                log.info("a refresh of the workers' models was cancelled under us; trying again next round")
            except Exception as e:  # workers down: keep what we know, the pool answers 503
                log.info("could not refresh the workers' models: %s: %s", type(e).__name__, e)

    async def resolve(self, name: str) -> ResolvedModel:
        config = self.lookup(name)
        worker_model = config.worker_model
        if worker_model not in self._info:
            missing_since = self._missing_since.get(worker_model)
            if missing_since is None or time.monotonic() - missing_since >= self.negative_ttl_s:
                try:
                    await self.refresh()
                except Exception as e:
                    # A failed round is a miss too: without this, every request for the model
                    # would ask every worker again (all refusing our token, say).
                    self._missing_since[worker_model] = time.monotonic()
                    self._failure = e
                    raise
            elif self._failure is not None:  # remembered: the same answer, without asking again
                raise self._failure.with_traceback(None)
        info = self._info.get(worker_model)
        if info is None:
            raise WorkerUnavailableError(f"no ready worker serves model '{name}' ({worker_model}) right now")
        caps = self._caps
        limits = info.capped(
            max_n=caps.max_n, max_steps=caps.max_steps, max_prompt_chars=caps.max_prompt_chars, max_side=config.max_side
        )
        return ResolvedModel(name, config, limits)

    def listing(self) -> ModelList:
        return ModelList(data=[self._model(name) for name in self._by_name])

    def get(self, name: str) -> Model:
        self.lookup(name)
        return self._model(name)

    def _model(self, name: str) -> Model:
        """A model as listed, with the LoRAs its workers serve (as of the last refresh)."""
        info = self._info.get(self._by_name[name].worker_model)
        return Model(id=name, created=self._created, loras=list(info.loras) if info else [])


def _retrieve(task: asyncio.Task) -> None:
    """Mark a refresh's failure as seen: the callers that awaited it got it already, and one
    nobody awaited any more (all cancelled) must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()
