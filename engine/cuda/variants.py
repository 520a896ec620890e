"""The LoRA variant sessions of one component on the CUDA runtime, least recently used dropped.

On CUDA one session serves every size, so a LoRA variant (engine/lora/variants.py) costs one more
session: its changed weights given with `add_initializer`, the rest read from the package again
(GPU memory per variant session is still to be measured). Variants are the clients' choice, so
at most `max_variants` are kept per component; the least recently used is dropped, and
`on_drop(session)` lets the binding free that session's device buffers (`BoundComponent.forget`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from engine.lora.variants import Variant, describe_variant

log = logging.getLogger(__name__)

# Passes a variant session must not run. onnxruntime's ConstantFolding computes a node over
# constant inputs from the model's own initializers, not from ones given with `add_initializer`
# (onnxruntime 1.32, CPU EP: a to_q override feeding the cuda package's Concat -> Attention was
# silently dropped at "basic" and above, honoured with this pass off, even at "all"). The cuda
# package rebuilds fused weights from the originals through such nodes (export/cuda_fp16.py), so
# a variant runs them every call instead.
DISABLED_OPTIMIZERS = ["ConstantFolding"]

S = TypeVar("S")


class VariantSessions(Generic[S]):
    """variant -> session, built on first use by `build(variant)`, at most `max_variants` kept."""

    def __init__(self, name: str, build: Callable[[Variant], S], max_variants: int, on_drop: Callable[[S], object] | None = None):
        if max_variants < 1:
            raise ValueError(f"{name}: max_variants must be at least 1, got {max_variants}")
        self.name = name
        self.build = build
        self.max_variants = max_variants
        self.on_drop = on_drop
        self._sessions: OrderedDict[Variant, S] = OrderedDict()  # least recently used first
        # Held while building too: two first uses of one variant must not build it twice, and a
        # build is rare next to the steps that reuse it.
        self._lock = threading.Lock()
        self.evictions = 0

    def session(self, variant: Variant) -> S:
        with self._lock:
            found = self._sessions.get(variant)
            if found is None:
                found = self._sessions[variant] = self.build(variant)
                log.info("%s: session for %s", self.name, describe_variant(variant))
            self._sessions.move_to_end(variant)
            while len(self._sessions) > self.max_variants:
                old, dropped = self._sessions.popitem(last=False)
                self.evictions += 1
                log.info("%s: dropped the session for %s (least recently used)", self.name, describe_variant(old))
                if self.on_drop is not None:
                    self.on_drop(dropped)
            return found

    @property
    def variants(self) -> list[Variant]:
        """The variants kept, least recently used first."""
        with self._lock:
            return list(self._sessions)
