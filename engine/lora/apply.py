"""A LoRA matched to a package's weights, and its deltas in the package's initializer layout.

A package names its weights as the ONNX export left them: most keep the torch parameter name
(`conv_in.weight`, `time_embedding.linear_1.weight`), but a Linear's weight becomes the second
input of a MatMul, stored transposed (in, out) under a generated name (`onnx::MatMul_1641`);
export/package.py records which parameter each of those is (`param`, `transposed` in
`<component>/weights.json`). A delta is computed as the parameter's (out, in[, kh, kw]) and
transposed where the initializer is.

The merge is PEFT's (`peft.tuners.lora.layer`, `get_delta_weight`), which diffusers'
`fuse_lora(lora_scale=s)` applies: W' = W + s * (alpha / rank) * up @ down; for a convolution,
up (out, rank, 1, 1) and down (rank, in, kh, kw) give delta[o, i, h, w] = sum_r up[o, r] down[r, i, h, w].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import PackageError
from engine.lora.errors import LoraMismatchError, LoraScaleError
from engine.lora.layouts import COMPONENTS, LoraPair, parse_lora
from engine.lora.ldm_names import ldm_unet_names
from engine.lora.safetensors_file import read_safetensors
from engine.request import MAX_LORA_SCALE, MIN_LORA_SCALE

# Scales a request may ask for: engine/request.py says why, and validates requests with them.
MIN_SCALE, MAX_SCALE = MIN_LORA_SCALE, MAX_LORA_SCALE


@dataclass(frozen=True)
class Target:
    """Where a torch parameter lives in a package: the initializer, its shape there, and whether transposed."""

    initializer: str
    shape: tuple[int, ...]
    transposed: bool


def package_targets(package: Path) -> dict[str, dict[str, Target]]:
    """component -> torch parameter name -> Target, for the components a LoRA can adapt."""
    out: dict[str, dict[str, Target]] = {}
    for component in COMPONENTS:
        index_path = Path(package) / component / "weights.json"
        if not index_path.is_file():
            continue
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise PackageError(f"cannot read {index_path}: {e}") from None
        targets = {}
        for name, entry in index.items():
            if "param" in entry:
                targets[entry["param"]] = Target(name, tuple(entry["shape"]), bool(entry.get("transposed")))
            elif name.startswith("onnx::") and not name.startswith("onnx::MatMul"):
                continue  # a constant the exporter folded (a GroupNorm's scale, say): no parameter
            elif name.startswith("onnx::"):
                raise PackageError(
                    f"{index_path} does not say which parameter {name} is: the package was exported before Kiln "
                    f"recorded that (LoRA support); re-export it with `kiln export ... --force`"
                )
            else:
                targets[name] = Target(name, tuple(entry["shape"]), False)
        out[component] = targets
    return out


@dataclass(frozen=True)
class MatchedPair:
    pair: LoraPair
    param: str  # the torch parameter, e.g. down_blocks.0.attentions.0.proj_in.weight
    target: Target


@dataclass(frozen=True)
class MatchedLora:
    """A LoRA file checked against a package: every pair has a weight of the right shape."""

    layout: str
    pairs: list[MatchedPair]

    @property
    def components(self) -> list[str]:
        return sorted({m.pair.component for m in self.pairs})

    def deltas(self, scale: float) -> dict[str, dict[str, np.ndarray]]:
        """component -> initializer -> float32 delta in the initializer's layout, for `scale`."""
        check_scale(scale)
        out: dict[str, dict[str, np.ndarray]] = {}
        for m in self.pairs:
            delta = pair_delta(m.pair, scale)
            delta = delta.reshape(_torch_shape(m.target))
            if m.target.transposed:
                delta = np.ascontiguousarray(delta.T)
            bucket = out.setdefault(m.pair.component, {})
            bucket[m.target.initializer] = bucket.get(m.target.initializer, 0) + delta
        return out


def check_scale(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise LoraScaleError(f"a LoRA scale must be a number, got {scale!r}", param="loras")
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise LoraScaleError(f"a LoRA scale must be in [{MIN_SCALE}, {MAX_SCALE}], got {scale}", param="loras")


def pair_delta(pair: LoraPair, scale: float) -> np.ndarray:
    """scale * alpha / rank * up @ down as the parameter's torch shape: (out, in) or (out, in, kh, kw)."""
    factor = scale * (pair.alpha if pair.alpha is not None else pair.rank) / pair.rank
    up = pair.up.reshape(pair.up.shape[0], pair.rank).astype(np.float32)
    down = pair.down.astype(np.float32)
    if down.ndim == 4:
        delta = np.einsum("or,rihw->oihw", up, down)  # (out, in, kh, kw)
    else:
        delta = up @ down  # (out, in)
    return (factor * delta).astype(np.float32)


def _torch_shape(target: Target) -> tuple[int, ...]:
    return tuple(reversed(target.shape)) if target.transposed else target.shape


def _expected_shapes(pair: LoraPair, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The down and up shapes a LoRA of `pair.rank` must have for a parameter of torch `shape`."""
    r = pair.rank
    if len(shape) == 4 and pair.down.ndim == 4:
        return (r, shape[1], shape[2], shape[3]), (shape[0], r, 1, 1)
    if len(shape) == 4 and shape[2:] == (1, 1):  # a Linear LoRA on a 1x1 conv (SD 1.x proj_in/out)
        return (r, shape[1]), (shape[0], r)
    return (r, *shape[1:]), (shape[0], r)


def _kohya_names(component: str, params: dict[str, Target]) -> dict[str, str]:
    """`_`-spelled module name -> torch parameter, for every spelling a kohya key may use.

    A UNet's modules go by their diffusers names and, for the LoRAs kohya sd-scripts trains on SDXL
    (whose UNet it builds with the original block numbering), by their original (ldm) names too:
    `input_blocks_4_1_transformer_blocks_0_attn1_to_q`. The two never spell the same name (the
    ldm names start input_blocks / middle_block / output_blocks / time_embed / label_emb / out).
    """
    names = {p: p for p in params}
    if component == "unet":
        names.update(ldm_unet_names(params))
    return {name.removesuffix(".weight").replace(".", "_"): param for name, param in names.items()}


def match_lora(package: Path, lora_file: Path) -> MatchedLora:
    """Read `lora_file` and match it to `package`'s weights; LoraMismatchError names what does not fit."""
    tensors, metadata = read_safetensors(lora_file)
    parsed = parse_lora(tensors, metadata)
    targets = package_targets(package)
    flat = {c: _kohya_names(c, t) for c, t in targets.items()}
    unused = list(parsed.unused)
    matched = []
    for pair in sorted(parsed.pairs, key=lambda p: p.keys):
        params = targets.get(pair.component, {})
        param = flat.get(pair.component, {}).get(pair.module) if pair.kohya else f"{pair.module}.weight"
        if param is None or param not in params:
            unused.extend(pair.keys)
            continue
        matched.append(MatchedPair(pair, param, params[param]))
    if unused:
        raise LoraMismatchError(
            f"{lora_file}: {len(unused)} of its {len(tensors)} keys match no weight of {package} "
            f"({', '.join(sorted(targets))}); is it a LoRA for another model family? Unused keys: {', '.join(sorted(unused))}"
        )
    for m in matched:
        shape = _torch_shape(m.target)
        want_down, want_up = _expected_shapes(m.pair, shape)
        for key, array, want in ((m.pair.down_key, m.pair.down, want_down), (m.pair.up_key, m.pair.up, want_up)):
            if tuple(array.shape) != want:
                raise LoraMismatchError(
                    f"{lora_file}: {key} has shape {list(array.shape)}, but {m.pair.component}'s {m.param} "
                    f"{list(shape)} needs {list(want)} for a rank-{m.pair.rank} LoRA (a LoRA for another model, "
                    f"or its up and down ranks differ)"
                )
    return MatchedLora(parsed.layout, matched)
