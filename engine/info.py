"""`kiln info`: a package's manifest as a readable table."""

from __future__ import annotations

from pathlib import Path

from engine.lora.store import list_loras
from engine.manifest import read_manifest


def _shape(spec) -> str:
    return f"{spec.name}:{spec.dtype}[{','.join(str(d) for d in spec.shape)}]"


def describe_package(package: Path) -> str:
    m = read_manifest(package)
    size_bytes = sum(p.stat().st_size for p in Path(package).rglob("*") if p.is_file())
    rows = [
        ("name", m.name),
        ("family", m.family),
        ("prediction", m.prediction_type),
        ("target", f"{m.target} ({m.precision}, opset {m.opset})"),
        *([("runs", "OpenVINO CPU plugin, bf16 where the CPU has it (AVX512-BF16, AMX), else fp32; "
                    "KILN_OPENVINO_PRECISION=f32 forces fp32")] if m.target == "openvino" else []),
        ("sizes", f"{m.sizes.min_side}..{m.sizes.max_side} px per side, multiples of {m.sizes.multiple_of}; default {m.sizes.default}"),
        ("defaults", f"{m.defaults.sampler}, {m.defaults.steps} steps, guidance {m.defaults.guidance_scale:g}"
                     + (f", rescale {m.defaults.guidance_rescale:g}" if m.defaults.guidance_rescale else "")),
        ("latents", f"{m.latent_channels} channels, 1/{m.vae_scale_factor} scale, VAE factor {m.vae_scaling_factor:g}"),
        ("source", f"digest {m.source_digest[:16]}..., {len(m.source_files)} files"),
        ("tools", ", ".join(f"{k} {v}" for k, v in sorted(m.tools.items()))),
        ("on disk", f"{size_bytes / 2**20:.1f} MiB"),
    ]
    for name, comp in m.components.items():
        rows.append((name, f"{comp.file}  in: {' '.join(_shape(s) for s in comp.inputs)}"))
        rows.append(("", f"out: {' '.join(_shape(s) for s in comp.outputs[:3])}" + (" ..." if len(comp.outputs) > 3 else "")))
    for tok in m.tokenizers:
        rows.append(("tokenizer", f"{tok.folder}/tokenizer.json, max {tok.max_length} tokens, pad id {tok.pad_id}"))
    loras = list_loras(package)
    rows.append(("loras", f"{len(loras)} (`kiln lora add` stores one; a request uses it as <lora:NAME:0.8>)"))
    for entry in loras.values():
        rows.append(("", f"{entry.name}: {entry.layout}, {entry.weights} weights of {', '.join(entry.components)}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
