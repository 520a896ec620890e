"""A worker's LoRAs: which components a request's LoRAs change, and the changed weights themselves.

A *variant* of a component is the set of LoRAs (name, scale) a request applies to it, sorted by
name, LoRAs that do not touch the component and scales of 0 left out: so `()` is the base model,
a UNet-only LoRA leaves the text encoders' variant `()`, and requests asking for the same LoRAs
at the same scales share one variant, in any order.

A variant's weights are the base initializers it changes, each W + sum(scale * delta) in the
initializer's own dtype, and nothing else: every other weight stays the base's shared buffer
(engine/sessions.py hands both to onnxruntime with `add_initializer`). They are computed one
initializer at a time, so building them needs one float32 tensor on top of the result.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from engine.lora.apply import MatchedLora, MatchedPair, pair_delta
from engine.lora.store import StoredLora, list_loras, load_entry

Variant = tuple[tuple[str, float], ...]  # ((name, scale), ...) sorted by name; () = the base weights
# Scales are applied to this many decimals: 0.8 and 0.80001 are one variant (one set of sessions),
# not two, whatever a client sends.
SCALE_DECIMALS = 3
# LoRA files kept read (their low-rank factors: small next to a variant's weights) for the next
# variant that uses them; older ones are read again when needed.
MATCHED_KEPT = 8


class LoraLibrary:
    """The LoRAs stored with one package, read as the worker starts (`loras.json`); each file is
    read and checked again (its hash, its shapes) the first time a request uses it."""

    def __init__(self, package: Path, stored: Mapping[str, StoredLora] | None = None):
        self.package = Path(package)
        self.stored: dict[str, StoredLora] = dict(list_loras(self.package) if stored is None else stored)
        self._matched: OrderedDict[str, MatchedLora] = OrderedDict()
        self._lock = threading.Lock()  # the scheduler and the session builder both read LoRAs

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.stored))

    def variant(self, choices: Iterable, component: str) -> Variant:
        """The variant of `component` for a request's LoRA choices (objects with name and scale)."""
        picked = {c.name: round(float(c.scale), SCALE_DECIMALS) for c in choices}
        return tuple(sorted(
            (name, scale)
            for name, scale in picked.items()
            if scale != 0 and name in self.stored and component in self.stored[name].components
        ))

    def matched(self, name: str) -> MatchedLora:
        """The LoRA as stored when the worker started: a file replaced since is refused, since
        what it changes (components, shapes) was listed from the one it replaced."""
        with self._lock:
            found = self._matched.get(name)
            if found is None:
                found = self._matched[name] = load_entry(self.package, self.stored[name])
                while len(self._matched) > MATCHED_KEPT:
                    self._matched.popitem(last=False)
            self._matched.move_to_end(name)
            return found

    def changed_weights(self, component: str, variant: Variant, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """initializer -> base + sum of the variant's deltas, in the base's dtype and layout."""
        by_initializer: dict[str, list[tuple[MatchedPair, float]]] = defaultdict(list)
        for name, scale in variant:
            for m in self.matched(name).pairs:
                if m.pair.component == component:
                    by_initializer[m.target.initializer].append((m, scale))
        out = {}
        for initializer, contributions in by_initializer.items():
            original = base[initializer]
            weight = original.astype(np.float32)  # a copy: the base buffer is the mapped file's
            for m, scale in contributions:
                delta = pair_delta(m.pair, scale)
                delta = delta.reshape(tuple(reversed(m.target.shape)) if m.target.transposed else m.target.shape)
                weight += delta.T if m.target.transposed else delta
            out[initializer] = weight.astype(original.dtype, copy=False)
        return out


def describe_variant(variant: Variant) -> str:
    return ", ".join(f"{name}:{scale:g}" for name, scale in variant) or "no LoRA"
