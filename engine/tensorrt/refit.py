"""LoRAs on TensorRT engines: the weights a LoRA variant changes, written into the engine (refit).

NOT YET RUN ON A GPU (see engine/tensorrt/__init__.py). Written against the TensorRT 10 Python
API as its docs and NVIDIA's demo/Diffusion use it (`demo_diffusion/engine.py`, `Engine.refit`):
an engine built with `BuilderFlag.REFIT` ("Refitting an Engine", TensorRT developer guide) takes
new weights through `trt.Refitter(engine, logger)`: `set_named_weights(name, trt.Weights(array))`
per weight, `get_missing_weights()` for weights TensorRT fused with a set one and so needs too,
then `refit_cuda_engine()`. The ONNX parser names an engine's weights after the ONNX initializers
(`INetworkDefinition.set_weights_name`, per the same guide), which are the names in the
package's `weights.json` and so the names `LoraLibrary.changed_weights` returns.

An engine holds one set of weights at a time, so a component's engine is switched between LoRA
variants (engine/lora/variants.py) between calls: before a call whose variant differs from the
one the engine holds, the weights the two variants change are written, each either the next
variant's (W + sum(scale * delta)) or the base's again, read from the package's weights.bin,
which is exactly what the engine was built from. Nothing else is written. So a switch costs a
refit of the weights the two variants change (a LoRA on every attention layer of SD 1.5 changes
hundreds of MiB; TensorRT-Redux, a ComfyUI node that refits the same way, reports about a second;
not measured here), and a call of the variant the engine holds costs nothing. Each engine (one
per size) switches on its own. The scheduler (engine/worker/scheduler.py) batches samples per
(model, shape, UNet variant) group and steps the groups round-robin, so one variant at a time
refits once, but two variants running at one size refit at every UNet call.

What only a GPU can verify: that the parser names each LoRA target as its ONNX initializer (a
name the engine does not list is refused here, naming it); that a refitted engine's images match
the cpu package's LoRA images within fp16 tolerance, and a switch back gives the base's images;
what a switch costs; and what REFIT costs in speed and accuracy: TensorRT may fuse fewer weights,
and TensorRT 11.3's guide warns that a REFIT engine may drop a GEMM bias (a known issue in its
release notes), so a REFIT engine's base images are to be compared with a plain engine's.
`trt.OnnxParserRefitter` is not used: it refits every weight from an ONNX file, where a variant
changes a few weights that exist only in memory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from engine.errors import EngineError, PackageError
from engine.lora.layouts import COMPONENTS
from engine.lora.variants import LoraLibrary, Variant, describe_variant
from engine.manifest import Component
from engine.tensorrt.cache import TensorRTSection, rebuild_command

log = logging.getLogger(__name__)

# The components LoRAs adapt: only their engines are built refittable (the VAE keeps every
# optimisation REFIT could cost).
REFIT_COMPONENTS = COMPONENTS


def refit_refusal(section: TensorRTSection, package: Path) -> str | None:
    """Why the package's engines cannot apply LoRAs, or None when every engine of a component
    LoRAs adapt was built refittable."""
    fixed = [e.file for e in section.engines if e.component in REFIT_COMPONENTS and not e.refit]
    if not fixed:
        return None
    return (
        f"its engines {', '.join(fixed)} were built without refit, so no LoRA can be written into them; "
        f"rebuild them refittable with `{rebuild_command(package)} --refit`"
    )


def base_weights(package: Path, component: Component) -> dict[str, np.ndarray]:
    """initializer -> its array in weights.bin, mapped read-only: the weights the engine was built
    from (what engine/sessions.py's SharedWeights maps for onnxruntime, without its OrtValues)."""
    if component.weights_file is None:
        return {}
    weights = package / component.weights_file
    try:
        index = json.loads(weights.with_name("weights.json").read_text())
        blob = np.memmap(weights, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise PackageError(f"cannot read the weights of {component.file}: {e}") from None
    arrays = {}
    for name, entry in index.items():
        raw = blob[entry["offset"] : entry["offset"] + entry["length"]]
        if raw.shape[0] != entry["length"]:
            raise PackageError(f"{weights} is truncated: {name} runs past its end; re-export the package")
        arrays[name] = np.frombuffer(raw, dtype=entry["dtype"]).reshape(entry["shape"])
    return arrays


@dataclass
class EngineWeights:
    """The LoRA state of one refittable engine: the variant it holds and the weights it can take."""

    label: str  # "unet 512x512", for messages
    engine: object  # tensorrt.ICudaEngine
    refittable: frozenset[str]  # Refitter.get_all_weights()
    variant: Variant | None = ()  # None: unknown, after a refit TensorRT refused


class ComponentRefit:
    """Switches one component's engines (one per size, or one for every size) between variants.

    Called under the component's lock, with no inference in flight: TensorRTComponent
    synchronises its stream after every call, and `refit_cuda_engine` runs on its own."""

    def __init__(self, trt, component: str, base: Mapping[str, np.ndarray], loras: LoraLibrary, logger=None):
        self._trt = trt
        self.component = component
        self.base = base
        self.loras = loras
        self._logger = logger or trt.Logger(trt.Logger.WARNING)
        self._engines: list[EngineWeights] = []
        # variant -> its changed weights (base dtype), while an engine holds it or is switching to it
        self._variants: dict[Variant, dict[str, np.ndarray]] = {(): {}}
        self.refits = 0  # refits done, for tests and logs
        self.weights_set = 0  # weights written over all refits

    def attach(self, engine, label: str) -> EngineWeights:
        """Register an engine as loaded (holding the base weights); refuse one built without REFIT."""
        if not engine.refittable:
            raise PackageError(
                f"{label}: the manifest records this TensorRT engine as refittable but TensorRT says it is not; "
                f"rebuild the engines with `--refit`"
            )
        names = frozenset(self._trt.Refitter(engine, self._logger).get_all_weights())
        held = EngineWeights(label, engine, names)
        self._engines.append(held)
        return held

    @property
    def cached_variants(self) -> list[Variant]:
        """The variants whose changed weights are kept now: the base and those an engine holds."""
        return list(self._variants)

    def variant_weights(self, variant: Variant) -> dict[str, np.ndarray]:
        """initializer -> W + sum(scale * delta) for the weights `variant` changes ({} for the base)."""
        found = self._variants.get(variant)
        if found is None:
            found = self._variants[variant] = self.loras.changed_weights(self.component, variant, self.base)
        return found

    def switch(self, held: EngineWeights, variant: Variant) -> int:
        """Make `held`'s engine compute with `variant`'s weights; returns how many were written."""
        if held.variant == variant:
            return 0
        start = time.perf_counter()
        target = self.variant_weights(variant)
        updates = self._updates(held, target)
        refused = sorted(set(updates) - held.refittable)
        if refused:
            raise PackageError(
                f"{held.label}: TensorRT cannot refit {len(refused)} of the weights {describe_variant(variant)} changes "
                f"({', '.join(refused[:5])}{', ...' if len(refused) > 5 else ''}): the engine is refittable but does not "
                f"list them (Refitter.get_all_weights): TensorRT may have folded them into other weights"
            )
        refitter = self._trt.Refitter(held.engine, self._logger)
        keep = [self._set(refitter, held, name, array) for name, array in updates.items()]
        # Weights TensorRT fused with one just set must be given again, at the next variant's values.
        missing = sorted(refitter.get_missing_weights())
        unknown = [name for name in missing if name not in target and name not in self.base]
        if unknown:
            raise PackageError(
                f"{held.label}: TensorRT also needs the weights {', '.join(unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''} to refit, which the package's weights.bin does not hold"
            )
        keep += [self._set(refitter, held, name, target.get(name, self.base.get(name))) for name in missing]
        held.variant = None  # until TensorRT says the refit is whole
        if not refitter.refit_cuda_engine():
            raise EngineError(f"{held.label}: TensorRT failed to refit the engine for {describe_variant(variant)} (see its log)")
        held.variant = variant
        self.refits += 1
        self.weights_set += len(keep)
        self._forget_unheld()
        log.info("%s: refitted %d weights (%.1f MiB) for %s in %.0f ms", held.label, len(keep),
                 sum(a.nbytes for a in keep) / 2**20, describe_variant(variant), (time.perf_counter() - start) * 1e3)
        return len(keep)

    def _updates(self, held: EngineWeights, target: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights that differ between what the engine holds and `target`, at target's values."""
        if held.variant is None:  # a refused refit leaves the engine unknown: write all we have
            names = sorted(held.refittable & (self.base.keys() | target.keys()))
            return {name: target.get(name, self.base.get(name)) for name in names}
        current = self.variant_weights(held.variant)
        updates = {}
        for name in sorted(current.keys() | target.keys()):
            new = target[name] if name in target else self.base[name]  # the base's again where only current changed it
            if name in current and name in target and np.array_equal(current[name], new):
                continue  # both variants give it the same value
            updates[name] = new
        return updates

    def _set(self, refitter, held: EngineWeights, name: str, array: np.ndarray) -> np.ndarray:
        """Hand one weight to the refitter in the engine's dtype; the array must outlive the refit."""
        prototype = refitter.get_weights_prototype(name)  # dtype and count the engine was built with
        data = np.ascontiguousarray(array, dtype=np.dtype(self._trt.nptype(prototype.dtype)))
        if data.size != prototype.size:
            raise PackageError(
                f"{held.label}: weight {name} has {prototype.size} values in the engine and {data.size} in the package; "
                f"the engines are stale, rebuild them"
            )
        if not refitter.set_named_weights(name, self._trt.Weights(data)):
            raise EngineError(f"{held.label}: TensorRT refused the new values of {name} (see its log)")
        return data

    def _forget_unheld(self) -> None:
        """Drop the weights of variants no engine holds any more (the base's cost nothing)."""
        held = {e.variant for e in self._engines} | {()}
        for variant in [v for v in self._variants if v not in held]:
            del self._variants[variant]
