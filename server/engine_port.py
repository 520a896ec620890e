"""The narrow interface the front end needs from the engine workers.

`engine.client.pool.WorkerPool` satisfies it; the server is written against this Protocol so
HTTP code never depends on how workers are reached (gRPC today). Failures are raised as
`engine.errors` exceptions (and `TimeoutError` for a passed deadline), which `server/errors.py`
maps to HTTP statuses in one table.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from engine.client.pool import WorkerStatus
from engine.client.types import ImageRequest, GenerationResult, ModelLimits, ProgressCallback


@runtime_checkable
class EnginePort(Protocol):
    async def generate(
        self,
        params: ImageRequest,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Make `params.n` images; cancelling the awaiting task cancels the work in the worker."""
        ...

    async def models(self) -> list[ModelLimits]:
        """The models the ready workers serve (worker-side names)."""
        ...

    async def ready(self) -> bool:
        """True when at least one worker can take a request (asking changes no routing)."""
        ...

    def status(self) -> list[WorkerStatus]:
        """Each worker as the router sees it now (up or being probed back)."""
        ...

    async def close(self) -> None: ...
