"""WorkerPool: the front end's asyncio client for a set of engine workers (grpc.aio).

    pool = WorkerPool(["127.0.0.1:50051", "10.0.0.7:50051"], token=token)
    result = await pool.generate(ImageRequest(model="kiln-shapes", prompt="...", width=256,
                                              height=256, seed=1), timeout=60)

Routing: each request goes to the worker, among those up that serve its model, with the least
outstanding work (the sum over its requests in flight from this pool of n x steps x pixels /
512^2), ties broken round-robin. What a worker serves is what it last listed (`models()`, which
the front end's registry calls periodically); a worker that has not listed yet may get any model,
and one that answers NOT_FOUND is not asked for that model again until it lists again (the
request moves on to another worker; ModelNotFoundError only when none has it).

Failures: a worker that cannot be reached, dies mid-request (connection reset, UNAVAILABLE) or
is draining is marked down and the request is retried once on another worker; generation is
deterministic given the seed, so the caller gets the same images. A down worker is probed
(ServerReady) every `probe_interval` seconds and taken back once ready. A full queue
(RESOURCE_EXHAUSTED) moves the request to the next worker; QueueFullError only when every
worker up is full. Every other failure raises the engine.errors type the worker raised (see
engine.worker.status): InvalidRequestError(param=...), ModelNotFoundError, QueueFullError,
WorkerUnavailableError, DeadlineExceededError (a TimeoutError), NonFiniteOutputError, EngineError.

Worker token and TLS (engine/client/credentials.py): a plain address gets the pool's `token` and
`credentials` (None: plaintext); an Endpoint brings its own. A worker that refuses the token
(UNAUTHENTICATED) is a configuration error, not a dead worker: it is never marked down nor
probed in a loop; the request moves on to the next worker, and WorkerAuthError (a 503 whose
message says the worker token is wrong) is raised when no worker took it. It is logged once at
ERROR per worker, naming its address, until a call to that worker succeeds again.

Workers that come and go: `add(endpoint)` and `remove(address)` change the set at run time (a
removed worker's requests in flight finish there; new ones go elsewhere). A `discovery`
(engine/client/discovery.py: `dns:///name:port`, every address the name resolves to) drives them:
the pool starts it on first use, waits for its first answer before routing, asks it to resolve
again when a worker fails, and once more before saying no worker can take a request.

Health: `ready()` only asks; it never marks a worker down or up, so scraping /ready or /metrics
never changes routing. Only a failed call (transport failure, draining) marks a worker down.

Cancellation: if the task awaiting `generate` is cancelled (the HTTP client went away), the gRPC
call is cancelled and the worker drops the request's samples at its next step boundary.

Imports neither onnxruntime nor torch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from typing import TYPE_CHECKING, Sequence

import grpc
import msgspec

from engine.client.credentials import Endpoint
from engine.client.types import ImageRequest, GenerationResult, ModelLimits, ProgressCallback
from engine.errors import DeadlineExceededError, ModelNotFoundError, QueueFullError, WorkerAuthError, WorkerUnavailableError
from engine.worker import inference_pb2 as pb
from engine.worker import inference_pb2_grpc as pb_grpc
from engine.worker import wire
from engine.worker.status import from_status

if TYPE_CHECKING:
    from engine.client.discovery import DnsDiscovery

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # Notice a worker whose host vanished (no connection reset) within ~15 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly once a restarted worker listens again (gRPC's default backoff reaches 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
REFERENCE_PIXELS = 512 * 512
FALLBACK_STEPS = 30


class WorkerStatus(msgspec.Struct, frozen=True):
    address: str
    up: bool
    outstanding: float  # work in flight from this pool (n x steps x pixels / 512^2)
    in_flight: int  # requests in flight from this pool
    failures: int  # times it was marked down


class _WorkerGone(Exception):
    """The worker could not be reached, died or is draining: try another one."""


class _Worker:
    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.address = endpoint.address
        self.metadata = endpoint.metadata  # sent with every call: the worker token
        self.up = True  # optimistic until a call or a probe says otherwise
        # The models it listed (RepositoryIndex); None until it has: then it may serve any.
        self.models: frozenset[str] | None = None
        self.lacks: set[str] = set()  # models it answered NOT_FOUND for since it last listed
        self.refused_token = False  # its last answer was UNAUTHENTICATED (logged once)
        self.outstanding = 0.0
        self.in_flight = 0
        self.failures = 0
        self.removed = False  # left the pool (WorkerPool.remove): finishing what it has, then closed
        self.retired = False  # its channel is closing or closed: no new call may open it again
        self.probe: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None

    @property
    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self.retired:  # a call that would reopen a closed channel (and leak it) fails like a dead worker
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "the worker left the pool")
        if self._stub is None:  # created inside the running event loop
            credentials = self.endpoint.credentials
            if credentials is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            else:
                options = CHANNEL_OPTIONS
                if self.endpoint.tls_server_name:  # check the certificate against this name, not the address
                    options = [*options, ("grpc.ssl_target_name_override", self.endpoint.tls_server_name)]
                self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still on it get `grace` seconds to end (None: cancelled now)."""
        self.retired = True
        if self.probe:
            self.probe.cancel()
        if self._channel is not None:
            await self._channel.close(grace)
            self._channel = self._stub = None


class WorkerPool:
    def __init__(
        self,
        addresses: Sequence[str | Endpoint],
        *,
        token: str | None = None,  # for plain addresses: the worker token (None: send none)
        credentials: grpc.ChannelCredentials | None = None,  # for plain addresses: TLS (None: plaintext)
        retries: int = 1,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
        discovery: DnsDiscovery | None = None,  # workers found by DNS, besides `addresses`
    ):
        if not addresses and discovery is None:
            raise ValueError("WorkerPool needs at least one worker address (host:port) or a discovery")
        unique: dict[str, Endpoint] = {}
        for a in addresses:
            endpoint = a if isinstance(a, Endpoint) else Endpoint(a, token=token, credentials=credentials)
            unique.setdefault(endpoint.address, endpoint)
        self._workers = [_Worker(e) for e in unique.values()]
        self._leaving: set[_Worker] = set()  # removed, with requests still in flight
        self._closing: set[asyncio.Task] = set()
        self._discovery = discovery
        self.retries = retries
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._turn = 0
        self._default_steps: dict[str, int] = {}
        self._closed = False

    async def __aenter__(self) -> WorkerPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- generation ----------------------------------------------------------------------

    async def generate(
        self,
        params: ImageRequest,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        """Make `params.n` images on one worker; see the module docstring for routing and errors.

        `on_progress` (a function or coroutine function) gets each Progress; a request retried on
        another worker reports its steps again from the start.
        """
        if self._closed:
            raise WorkerUnavailableError("the worker pool is closed")
        await self._discovered()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        cost = self._cost(params)
        tried: set[_Worker] = set()
        failovers = 0
        full: QueueFullError | None = None
        refused: WorkerAuthError | None = None
        missing: ModelNotFoundError | None = None
        looked_again = False
        while True:
            worker = await self._pick(tried, params.model)
            if worker is None and self._discovery is not None and not looked_again:
                looked_again = True  # the workers may have moved: resolve once more, then decide
                await self._discovery.refresh()
                worker = await self._pick(tried, params.model)
            if worker is None:
                if full is not None:
                    raise full
                if refused is not None:
                    raise refused
                if missing is not None:
                    raise missing
                raise WorkerUnavailableError(
                    f"no worker can take a request for model '{params.model}': {', '.join(self._describe())}"
                )
            tried.add(worker)
            remaining = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DeadlineExceededError(f"the request's {timeout:g} s timeout passed before a worker answered")
            worker.outstanding += cost
            worker.in_flight += 1
            try:
                result = await self._call(worker, params, remaining, on_progress)
                self._accepted(worker)
                return result
            except WorkerAuthError as e:
                refused = self._refused(worker, e)  # not down: a configuration error, another worker may take it
            except _WorkerGone as gone:
                self._mark_down(worker, str(gone))
                if failovers >= self.retries:
                    raise WorkerUnavailableError(
                        f"worker {worker.address} failed ({gone}) and the request was already retried {failovers} time(s)"
                    ) from None
                failovers += 1
                log.warning("worker %s failed mid-request (%s): retrying on another worker", worker.address, gone)
            except QueueFullError as e:
                full = e
            except ModelNotFoundError as e:
                # Its models changed since it listed them: remember, and try one that has it.
                worker.lacks.add(params.model)
                missing = e
            finally:
                worker.outstanding -= cost
                worker.in_flight -= 1
                if worker.removed and worker.in_flight == 0:
                    self._retire(worker)

    async def _call(
        self,
        worker: _Worker,
        params: ImageRequest,
        timeout: float | None,
        on_progress: ProgressCallback | None,
    ) -> GenerationResult:
        request = wire.encode_request(params, request_id=uuid.uuid4().hex)
        try:
            if on_progress is None:
                call = worker.stub.ModelInfer(request, timeout=timeout, metadata=worker.metadata)
                try:
                    return wire.decode_result(await call, worker.address)
                except BaseException:
                    call.cancel()  # a cancelled caller cancels the RPC: the worker frees the samples
                    raise
            stream = worker.stub.ModelInferStream(request, timeout=timeout, metadata=worker.metadata)
            try:
                async for message in stream:
                    response = message.infer_response
                    if wire.event_of(response) != "progress":
                        return wire.decode_result(response, worker.address)
                    outcome = on_progress(wire.decode_progress(response))
                    if inspect.isawaitable(outcome):
                        await outcome
            except BaseException:
                stream.cancel()
                raise
            raise _WorkerGone("the progress stream ended without a result")
        except grpc.aio.AioRpcError as e:
            error = from_status(e.code(), e.details() or "", dict(e.trailing_metadata() or ()))
            if isinstance(error, WorkerAuthError):  # before its base class: never "worker gone"
                raise error from None
            if error is None or isinstance(error, WorkerUnavailableError):
                raise _WorkerGone(f"{e.code().name}: {e.details()}") from None
            raise error from None

    def _cost(self, params: ImageRequest) -> float:
        steps = params.steps or self._default_steps.get(params.model, FALLBACK_STEPS)
        if params.is_edit and params.strength is not None:
            steps = max(1.0, steps * params.strength)
        pixels = (params.width or 512) * (params.height or 512)
        return params.n * steps * pixels / REFERENCE_PIXELS

    async def _pick(self, tried: set[_Worker], model: str) -> _Worker | None:
        """The worker for a request for `model`: among those up that serve it (or have not said
        what they serve), the least outstanding work, ties round-robin."""
        serving = [w for w in self._workers if w not in tried and model not in w.lacks and (w.models is None or model in w.models)]
        candidates = [w for w in serving if w.up]
        if not candidates:
            # Before giving up, ask the down workers once: one may have come back since the last probe.
            down = [w for w in serving if not w.up]
            if down:
                await asyncio.gather(*(self._probe(w, wait_for_ready=True) for w in down))
                candidates = [w for w in down if w.up and not w.removed]  # one may have left meanwhile
        if not candidates:
            return None
        self._turn += 1
        n = len(self._workers)
        order = {w: i for i, w in enumerate(self._workers)}
        return min(candidates, key=lambda w: (w.outstanding, w.in_flight, (order[w] - self._turn) % n))

    # ---- membership ----------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self._workers]

    def add(self, endpoint: Endpoint) -> bool:
        """Take a worker in (it is tried at once, like a worker given at construction).
        False when a worker of that address is already in the pool."""
        if self._closed or any(w.address == endpoint.address for w in self._workers):
            return False
        self._workers.append(_Worker(endpoint))
        return True

    def remove(self, address: str) -> bool:
        """Let a worker go: no new requests; those in flight on it finish (or fail over as
        usual), then its channel is closed. False when no worker has that address."""
        worker = next((w for w in self._workers if w.address == address), None)
        if worker is None:
            return False
        self._workers.remove(worker)
        worker.removed = True
        if worker.probe is not None:
            worker.probe.cancel()
        if worker.in_flight:
            self._leaving.add(worker)
        else:
            self._retire(worker)
        return True

    def _retire(self, worker: _Worker) -> None:
        self._leaving.discard(worker)
        # Probes, model listings and metrics calls are not counted in `in_flight`; closing the channel
        # under them would raise CancelledError in their callers. Each has probe_timeout to finish.
        task = asyncio.get_running_loop().create_task(worker.close(grace=self.probe_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _discovered(self) -> None:
        """Start the discovery (inside the running loop) and wait for its first answer."""
        if self._discovery is not None and not self._closed:
            if not self._discovery.started:
                self._discovery.start(self)
            await self._discovery.first_round()

    # ---- health --------------------------------------------------------------------------

    def _mark_down(self, worker: _Worker, reason: str) -> None:
        if worker.up:
            log.warning("worker %s marked down: %s", worker.address, reason)
            worker.up = False
            worker.failures += 1
        if self._discovery is not None:
            self._discovery.nudge()  # a replacement may already be in DNS
        if (worker.probe is None or worker.probe.done()) and not self._closed and not worker.removed:
            worker.probe = asyncio.get_running_loop().create_task(self._probe_until_up(worker))

    def _refused(self, worker: _Worker, error: WorkerAuthError) -> WorkerAuthError:
        """Note that `worker` refused our token; the error to raise, naming the worker."""
        if not worker.refused_token:
            log.error("worker %s refused the worker token: %s", worker.address, error)  # the token itself is never logged
            worker.refused_token = True
        return WorkerAuthError(f"worker {worker.address} refused this front end's worker token: {error}")

    def _accepted(self, worker: _Worker) -> None:
        if worker.refused_token:
            log.info("worker %s accepts the worker token again", worker.address)
            worker.refused_token = False

    async def _ask_ready(self, worker: _Worker, wait_for_ready: bool = False) -> bool:
        """ServerReady, read-only: changes nothing about routing. `wait_for_ready`: wait up to
        probe_timeout for the channel to connect, rather than failing at once while it is still
        backing off from the worker's death (a restarted worker can be up before its channel knows)."""
        try:
            reply = await worker.stub.ServerReady(
                pb.ServerReadyRequest(), timeout=self.probe_timeout, metadata=worker.metadata, wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._refused(worker, WorkerAuthError(e.details() or "UNAUTHENTICATED"))
            return False
        self._accepted(worker)
        return reply.ready

    async def _probe(self, worker: _Worker, wait_for_ready: bool = False) -> bool:
        """ServerReady, and take the worker back when it is ready (routing's own probe)."""
        ready = await self._ask_ready(worker, wait_for_ready)
        if ready and not worker.up:
            log.info("worker %s is ready again", worker.address)
            worker.up = True
        return ready

    async def _probe_until_up(self, worker: _Worker) -> None:
        while not self._closed and not worker.removed:
            await asyncio.sleep(self.probe_interval)
            if await self._probe(worker):
                return

    async def ready(self) -> bool:
        """Ask every worker now; True when at least one is ready. Read-only: health endpoints
        (/ready, /metrics) call it, and scraping them must never change where requests go."""
        await self._discovered()
        return any(await asyncio.gather(*(self._ask_ready(w) for w in self._workers)))

    def status(self) -> list[WorkerStatus]:
        return [WorkerStatus(w.address, w.up, w.outstanding, w.in_flight, w.failures) for w in self._workers]

    def _describe(self) -> list[str]:
        found = [f"{w.address} {'up' if w.up else 'down'}" for w in self._workers]
        return found + (self._discovery.describe() if self._discovery is not None else [])

    # ---- models and metrics --------------------------------------------------------------

    async def models(self) -> list[ModelLimits]:
        """The models the workers serve (each once, as its first answering worker describes it,
        with only the LoRAs every worker serving it has: the pool may route to any of them)."""
        found: dict[str, ModelLimits] = {}
        await self._discovered()
        answered = False
        refused: WorkerAuthError | None = None
        for worker in [w for w in self._workers if w.up]:
            if worker.removed:  # left while we asked the others
                continue
            try:
                index = await worker.stub.RepositoryIndex(
                    pb.RepositoryIndexRequest(ready=True), timeout=self.probe_timeout, metadata=worker.metadata
                )
                worker.models, worker.lacks = frozenset(entry.name for entry in index.models), set()
                for entry in index.models:
                    meta = await worker.stub.ModelMetadata(
                        pb.ModelMetadataRequest(name=entry.name), timeout=self.probe_timeout, metadata=worker.metadata
                    )
                    info = wire.decode_model_metadata(meta)
                    if entry.name not in found:
                        found[entry.name] = info
                    elif set(info.loras) != set(found[entry.name].loras):
                        shared = tuple(name for name in found[entry.name].loras if name in info.loras)
                        log.info("workers of %s store different LoRAs; serving those all have: %s",
                                 entry.name, ", ".join(shared) or "none")
                        found[entry.name] = msgspec.structs.replace(found[entry.name], loras=shared)
                answered = True
                self._accepted(worker)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    refused = self._refused(worker, WorkerAuthError(e.details() or "UNAUTHENTICATED"))
                else:
                    log.info("worker %s did not list its models: %s", worker.address, e.code().name)
        if not answered:
            if refused is not None:
                raise refused
            raise WorkerUnavailableError(f"no worker answered: {', '.join(self._describe())}")
        for info in found.values():
            self._default_steps[info.name] = info.default_steps
        return sorted(found.values(), key=lambda m: m.name)

    async def metrics(self) -> dict[str, dict[str, float]]:
        """Each reachable worker's counters and gauges (WorkerMetrics), by address."""
        await self._discovered()
        out: dict[str, dict[str, float]] = {}
        for worker in list(self._workers):
            if worker.removed:
                continue
            try:
                reply = await worker.stub.WorkerMetrics(
                    pb.WorkerMetricsRequest(), timeout=self.probe_timeout, metadata=worker.metadata
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._refused(worker, WorkerAuthError(e.details() or "UNAUTHENTICATED"))
                continue
            out[worker.address] = {**{k: float(v) for k, v in reply.counters.items()}, **dict(reply.gauges)}
        return out

    async def close(self) -> None:
        self._closed = True
        if self._discovery is not None:
            await self._discovery.stop()
        await asyncio.gather(*(w.close() for w in [*self._workers, *self._leaving]), *self._closing)


__all__ = ["Endpoint", "WorkerPool", "WorkerStatus"]
