"""IOBinding for one component: device buffers per input shape, bound once, reused every run.

Per distinct set of input shapes (a "key": batch rows x latent size for the UNet) the component
gets its own IOBinding with its own device buffers. Inputs are copied into those buffers in
place (`OrtValue.update_inplace`), so their device addresses never change — what a CUDA graph
needs to be replayed. An input whose caller hands the very same read-only array object as last
time is not copied again: that is how text embeddings stay on the device between steps.

Outputs are bound to the device as well. Their shapes are learnt on a key's first run (onnxruntime
allocates them), after which fixed output buffers are bound, and from the second run on the key
may run as a CUDA graph (`gpu_graph_id` run option; onnxruntime captures it on first use and
replays it after). Only what the caller needs on the host is copied back (`OrtValue.numpy()`).

Keys are the client's choice (any size), so the bindings are bounded: at most `max_bound` keys
that run without a graph are kept, least recently used dropped first (their device buffers go
with them). Keys with a CUDA graph are kept for good: onnxruntime frees no captured graph, and
`graph_slots` already bounds them.

LoRA variants (engine/lora/variants.py) run on sessions of their own, given by
`session_for(fixed_dims, variant)`. Their keys never get a CUDA graph: a graph is kept for good,
and a variant's session is let go when it falls out of its bound (engine/cuda/variants.py), at
which point `forget(session)` drops its bindings with their device buffers.

The same code runs on the CPU execution provider with `device="cpu"`, which is how it is tested
without a GPU; CUDA graphs exist on CUDA only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

# session_for(fixed_dims) for the base weights, session_for(fixed_dims, variant) for a LoRA variant
SessionFor = Callable[..., ort.InferenceSession]


@dataclass
class BindingStats:
    """Where a component's time went, for the GPU check's copy-cost measurement (seconds, bytes)."""

    runs: int = 0
    graph_runs: int = 0  # runs that asked for a CUDA graph (the first of each is its capture)
    uploads: int = 0
    uploads_skipped: int = 0  # inputs left on the device because the caller passed the same array
    bytes_up: int = 0
    bytes_down: int = 0
    copy_in_s: float = 0.0
    run_s: float = 0.0
    copy_out_s: float = 0.0
    evictions: int = 0  # bindings dropped to stay within max_bound

    def reset(self) -> None:
        for name, value in vars(BindingStats()).items():
            setattr(self, name, value)


@dataclass
class _Bound:
    """One key's binding: device buffers at fixed addresses and what was last copied into them."""

    io: ort.IOBinding
    # Held so the session outlives its bindings: keys start with id(session), which a session
    # made after this one was freed could otherwise reuse.
    session: ort.InferenceSession
    inputs: dict[str, ort.OrtValue]
    outputs: dict[str, ort.OrtValue] = field(default_factory=dict)  # empty until the first run
    last: dict[str, np.ndarray] = field(default_factory=dict)  # host array last uploaded per input
    graph_id: int = -1  # -1: this key runs without a CUDA graph


class BoundComponent:
    """Runs one component through IOBinding; `run` has ComponentSessions' signature."""

    def __init__(
        self,
        name: str,
        session_for: SessionFor,
        input_names: list[str],
        output_names: list[str],
        device: str = "cuda",
        device_id: int = 0,
        graph_slots: int = 0,
        max_bound: int = 8,
    ):
        """`session_for(fixed_dims)` gives the session to run (one per resolution on CPU, one for
        all on CUDA). `graph_slots`: how many keys may run as CUDA graphs; give them only for a
        session created with `enable_cuda_graph`, since every run of such a session must say
        which graph it is (-1: none). Other providers ignore the run option."""
        self.name = name
        self.session_for = session_for
        self.device = device
        self.device_id = device_id
        self.graph_slots = graph_slots
        self.max_bound = max_bound  # keys without a graph kept bound (least recently used dropped)
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._graphs_used = 0
        self._bound: OrderedDict[tuple, _Bound] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.stats = BindingStats()

    @property
    def loaded_shapes(self) -> list[tuple]:
        return list(self._bound)

    @property
    def graph_keys(self) -> list[tuple]:
        """The keys that run as CUDA graphs, in order of their graph ids."""
        return sorted((k for k, b in self._bound.items() if b.graph_id >= 0), key=lambda k: self._bound[k].graph_id)

    def run(
        self, feeds: dict[str, np.ndarray], fixed_dims: dict[str, int] | None = None, variant: tuple = ()
    ) -> list[np.ndarray]:
        """Copy changed inputs in, run, copy every output back: (host arrays in output_names order).
        `variant`: the LoRA variant to run (() = the base weights)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {', '.join(missing)}")
        session = self.session_for(fixed_dims, variant) if variant else self.session_for(fixed_dims)
        key = (id(session), *((n, feeds[n].shape, feeds[n].dtype.str) for n in self.input_names))
        with self._lock:  # one run at a time per component: the buffers are shared state
            bound = self._bound.get(key) or self._bind(key, session, feeds, graphable=not variant)
            self._bound.move_to_end(key)
            t0 = time.perf_counter()
            self._copy_in(bound, feeds)
            t1 = time.perf_counter()
            first_run = not bound.outputs
            options = ort.RunOptions()
            if bound.graph_id >= 0 and not first_run:
                options.add_run_config_entry("gpu_graph_id", str(bound.graph_id))
                self.stats.graph_runs += 1
            elif self.graph_slots:
                options.add_run_config_entry("gpu_graph_id", "-1")  # this run is not a graph
            bound.io.synchronize_inputs()
            session.run_with_iobinding(bound.io, options)
            bound.io.synchronize_outputs()
            t2 = time.perf_counter()
            if first_run:
                results = [self._to_host(v) for v in bound.io.get_outputs()]
                self._fix_outputs(bound, results)
            else:
                results = [self._to_host(bound.outputs[n]) for n in self.output_names]
            t3 = time.perf_counter()
            s = self.stats
            s.runs += 1
            s.copy_in_s += t1 - t0
            s.run_s += t2 - t1
            s.copy_out_s += t3 - t2
            s.bytes_down += sum(r.nbytes for r in results)
        return results

    # ---- binding --------------------------------------------------------------------------

    def forget(self, session: ort.InferenceSession) -> int:
        """Drop every binding of `session` (one let go), freeing its device buffers; returns how
        many. The bindings hold the session (`_Bound.session`), so this is what frees it too."""
        with self._lock:
            stale = [k for k, b in self._bound.items() if k[0] == id(session) and b.graph_id < 0]
            for key in stale:
                del self._bound[key]
        return len(stale)

    def _bind(self, key: tuple, session: ort.InferenceSession, feeds: dict[str, np.ndarray], graphable: bool = True) -> _Bound:
        io = session.io_binding()
        inputs = {}
        for name in self.input_names:
            array = feeds[name]
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, self.device, self.device_id)
            io.bind_ortvalue_input(name, value)
            inputs[name] = value
        for name in self.output_names:  # the first run allocates them; their shapes fix the buffers
            io.bind_output(name, self.device, self.device_id)
        bound = _Bound(io=io, session=session, inputs=inputs)
        if graphable and self._graphs_used < self.graph_slots:
            bound.graph_id = self._graphs_used
            self._graphs_used += 1
            log.info("%s: CUDA graph %d for %s", self.name, bound.graph_id, _describe(key))
        self._bound[key] = bound
        unpinned = [k for k, b in self._bound.items() if b.graph_id < 0]
        for old in unpinned[: max(0, len(unpinned) - self.max_bound)]:
            del self._bound[old]  # its IOBinding and device buffers are freed with it
            self.stats.evictions += 1
            log.debug("%s: dropped the binding of %s (least recently used)", self.name, _describe(old))
        return bound

    def _copy_in(self, bound: _Bound, feeds: dict[str, np.ndarray]) -> None:
        for name in self.input_names:
            array = feeds[name]
            # Skipped only for the same read-only object: a writeable array may have been changed
            # in place since, and an equal-looking new array is not worth comparing element-wise.
            if bound.last.get(name) is array and not array.flags.writeable:
                self.stats.uploads_skipped += 1
                continue
            bound.inputs[name].update_inplace(np.ascontiguousarray(array))
            bound.last[name] = array
            self.stats.uploads += 1
            self.stats.bytes_up += array.nbytes

    def _to_host(self, value: ort.OrtValue) -> np.ndarray:
        # numpy() copies a CUDA tensor to the host but is a view of a CPU one, which the next run
        # would overwrite: copy it, so both devices hand out arrays the caller owns.
        array = value.numpy()
        return array.copy() if self.device == "cpu" else array

    def _fix_outputs(self, bound: _Bound, results: list[np.ndarray]) -> None:
        """Bind fixed output buffers of the shapes the first run produced."""
        for name, result in zip(self.output_names, results):
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(result.shape), result.dtype, self.device, self.device_id)
            bound.io.bind_ortvalue_output(name, value)
            bound.outputs[name] = value


def _describe(key: tuple) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape, _dtype in key[1:])
