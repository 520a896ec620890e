"""Latency per size: text encoding, one denoising step, VAE decode, PNG encode and end to end.

For one package and each size among the seed's five (or `--sizes`): one warm-up image (session
creation, first-run allocations and CUDA graph capture are excluded), then `--repeats` timed
images, each timed stage by stage with the step-level API the worker uses (`prepare` = text
encoding, `denoise_step` once per step, `decode`, `encode_png`). Where torch and the source
checkpoint are available, the diffusers PyTorch pipeline does the same work (fp32 on CPU, fp16
with SDPA on a GPU) and the ratio is printed. A size whose estimated activation memory does not
fit in the memory available is skipped with a note instead of being run into the OOM killer.

    python -m benchmarks.latency_per_size                          # bundled model, else tiny SD1
    python -m benchmarks.latency_per_size --quick                  # 4 steps, 1 timed image
    python -m benchmarks.latency_per_size --package build/sd15-random/cpu \
        --checkpoint build/checkpoints/sd15-random --sizes 256x256 --steps 3 --label sd15-architecture

Writes benchmarks/results/latency_per_size_<label>_<device>.json and a .png chart beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CPU_TARGETS = ("cpu", "openvino")
SEED_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")
PROMPT = "a red circle on a blue background"
# Peak activation memory ~ this many times the largest intermediate tensor: an attention score
# matrix and its softmax are alive together, and the arena rounds its chunks up.
PEAK_OVER_LARGEST = 3.0
MEMORY_HEADROOM = 0.8  # use at most this share of the memory available now

log = logging.getLogger("bench.latency")


# ---- what is timed --------------------------------------------------------------------------


@dataclass
class Timing:
    """Medians over the timed images of one size, in seconds."""

    text_encode_s: float
    step_s: float  # one denoising step: the UNet call (both CFG rows) plus the sampler update
    decode_s: float
    png_s: float
    end_to_end_s: float
    steps: int
    images: int
    step_samples: int  # how many step timings the median is taken over


@dataclass
class SizeResult:
    size: str
    engine: Timing | None = None
    diffusers: Timing | None = None
    skipped: str | None = None  # why the size was not run
    notes: list[str] = field(default_factory=list)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_engine(
    pipe, width: int, height: int, steps: int, repeats: int, sampler: str = "euler", sync=None, after_warmup=None
) -> Timing:
    """Time one image at a time through prepare -> denoise_step x steps -> decode -> PNG.

    `sync` (optional) is called before each clock read, for runtimes that return before the
    device is done; the ONNX Runtime paths copy results to the host, which already waits.
    `after_warmup` (optional) is called between the warm-up image and the timed ones.
    """
    from engine.pipeline import ImageRequest
    from engine.worker.images import encode_png

    sync = sync or (lambda: None)

    def one(seed: int) -> tuple[float, list[float], float, float, float]:
        req = ImageRequest(prompt=PROMPT, width=width, height=height, seed=seed, steps=steps, sampler=sampler)
        sync()
        t0 = time.perf_counter()
        samples = pipe.prepare([req])
        sync()
        t1 = time.perf_counter()
        step_times = []
        while not samples[0].done:
            ts = time.perf_counter()
            pipe.denoise_step(samples)
            sync()
            step_times.append(time.perf_counter() - ts)
        t2 = time.perf_counter()
        (image,) = pipe.decode(samples)
        if isinstance(image, Exception):
            raise image
        sync()
        t3 = time.perf_counter()
        encode_png(image)
        t4 = time.perf_counter()
        return t1 - t0, step_times, t3 - t2, t4 - t3, t4 - t0

    one(0)  # warm-up: sessions, arenas, CUDA graph capture
    if after_warmup:
        after_warmup()
    runs = [one(seed) for seed in range(1, repeats + 1)]
    all_steps = [t for run in runs for t in run[1]]
    return Timing(
        text_encode_s=_median([r[0] for r in runs]),
        step_s=_median(all_steps),
        decode_s=_median([r[2] for r in runs]),
        png_s=_median([r[3] for r in runs]),
        end_to_end_s=_median([r[4] for r in runs]),
        steps=steps,
        images=repeats,
        step_samples=len(all_steps),
    )


def time_diffusers(pipe, width: int, height: int, steps: int, guidance: float, repeats: int, device: str) -> Timing:
    """The same work through a diffusers pipeline: per-step times from its step callback."""
    import torch

    from engine.worker.images import encode_png

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def one(seed: int) -> tuple[list[float], float, float]:
        marks: list[float] = []

        def on_step_end(_pipe, _i, _t, kwargs):
            sync()
            marks.append(time.perf_counter())
            return kwargs

        generator = torch.Generator(device=device).manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        out = pipe(
            prompt=PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
            generator=generator, output_type="np", callback_on_step_end=on_step_end,
        )
        sync()
        pixels = (out.images[0] * 255).round().clip(0, 255).astype("uint8")
        t1 = time.perf_counter()
        encode_png(pixels)
        t2 = time.perf_counter()
        step_times = [b - a for a, b in zip(marks, marks[1:])]  # the first step also holds text encoding
        return step_times, t2 - t0, t2 - t1

    with torch.inference_mode():
        one(0)
        runs = [one(seed) for seed in range(1, repeats + 1)]
    all_steps = [t for run in runs for t in run[0]]
    return Timing(
        text_encode_s=float("nan"), step_s=_median(all_steps), decode_s=float("nan"), png_s=_median([r[2] for r in runs]),
        end_to_end_s=_median([r[1] for r in runs]), steps=steps, images=repeats, step_samples=len(all_steps),
    )


def load_diffusers(checkpoint: Path, sampler: str, device: str):
    """diffusers' pipeline for the checkpoint: fp32 on CPU, fp16 on CUDA (SDPA is its default)."""
    import torch

    from export.diffusers_reference import reference_pipeline

    pipe = reference_pipeline(str(checkpoint), sampler)
    if device == "cuda":
        pipe = pipe.to("cuda", torch.float16)
    return pipe


# ---- will it fit ----------------------------------------------------------------------------


def largest_activation_bytes(model_path: Path, dims: dict[str, int]) -> int | None:
    """The largest intermediate tensor of `model_path` with its dynamic axes fixed to `dims`.

    ONNX Runtime's symbolic shape inference over the graph alone (weights are not read: external
    initializers become inputs of their known shapes). None when the shapes cannot be inferred.
    """
    import numpy as np
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(model_path), load_external_data=False)
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                dim.dim_value = int(dims[dim.dim_param])
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        model.graph.initializer.remove(tensor)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as e:  # the inference raises plain Exceptions on graphs it cannot follow
        log.warning("cannot infer the shapes of %s (%s); not checking its memory", model_path, e)
        return None
    largest = 0
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if not shape or 0 in shape:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
        largest = max(largest, int(np.prod(shape, dtype=np.int64)) * itemsize)
    return largest


def estimated_peak_bytes(package: Path, manifest, width: int, height: int) -> dict[str, int]:
    """Per component, PEAK_OVER_LARGEST x its largest activation at this size (batch 2 UNet: CFG).
    A model with `render_max_side` draws large sizes smaller and upscales: its drawn size counts."""
    from engine.shapes import render_size

    width, height = render_size(width, height, manifest.sizes)
    h, w = height // manifest.vae_scale_factor, width // manifest.vae_scale_factor
    plans = {
        "unet": {"batch_size": 2, "height": h, "width": w, "sequence_length": 77},
        "vae_decoder": {"batch_size": 1, "latent_height": h, "latent_width": w},
    }
    out = {}
    for name, dims in plans.items():
        graph = package / manifest.components[name].file
        if graph.suffix != ".onnx":  # an openvino package: its cpu sibling has the same graph as ONNX
            graph = package.parent / "cpu" / name / "model.onnx"
            if not graph.is_file():
                log.info("no ONNX graph of %s to estimate its memory from; not checking it", name)
                continue
        largest = largest_activation_bytes(graph, dims)
        if largest is not None:
            out[name] = int(largest * PEAK_OVER_LARGEST)
    return out


def available_memory_bytes(device: str) -> int | None:
    """Memory a run may use now: MemAvailable on CPU, free device memory on CUDA (if torch can say)."""
    if device == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
        except Exception:  # torch missing or without CUDA: no check
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits(package: Path, manifest, width: int, height: int, device: str) -> str | None:
    """None if the size should fit; otherwise the note saying why it is skipped."""
    available = available_memory_bytes(device)
    if available is None:
        return None
    budget = available * MEMORY_HEADROOM
    for name, peak in estimated_peak_bytes(package, manifest, width, height).items():
        if peak > budget:
            return (
                f"skipped: {name} at {width}x{height} needs about {peak / 2**30:.1f} GiB of activations "
                f"({PEAK_OVER_LARGEST:g}x its largest tensor), more than {MEMORY_HEADROOM:.0%} of the "
                f"{available / 2**30:.1f} GiB {'of GPU memory' if device == 'cuda' else 'available'} here"
            )
    return None


# ---- where it ran ---------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    if device == "cuda" and shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        if done.returncode == 0:
            info["gpu"] = done.stdout.strip().splitlines()[0]
    versions = {}
    for dist in ("kiln", "numpy", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import onnxruntime as ort

        versions["onnxruntime_providers"] = ",".join(ort.get_available_providers())
    except ImportError:
        pass
    info["versions"] = versions
    return info


# ---- defaults -------------------------------------------------------------------------------


def default_workload() -> tuple[Path, Path | None, str]:
    """(package, checkpoint, label): the bundled model's package if exported, else tiny SD1."""
    from kiln.default_model import DEFAULT_MODEL, default_package

    for target in ("cuda", "cpu"):
        package = default_package(target)
        if (package / "manifest.json").is_file() and (target == "cpu" or _has_cuda_provider()):
            checkpoint = DEFAULT_MODEL if (DEFAULT_MODEL / "model_index.json").is_file() else None
            return package, checkpoint, f"{DEFAULT_MODEL.name}-{target}"
    from benchmarks.workloads import TINY_CHECKPOINT, tiny_package

    return tiny_package(), TINY_CHECKPOINT, "tiny-sd1"


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


# ---- the table and the files ----------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.1f}"


def format_table(results: list[SizeResult]) -> str:
    head = f"{'size':<10} {'text ms':>8} {'step ms':>9} {'decode ms':>10} {'png ms':>7} {'e2e ms':>9} {'diffusers step':>15} {'diffusers e2e':>14} {'x e2e':>6}"
    lines = [head]
    for r in results:
        if r.engine is None:
            lines.append(f"{r.size:<10} {r.skipped}")
            continue
        e, d = r.engine, r.diffusers
        ratio = f"{d.end_to_end_s / e.end_to_end_s:.2f}" if d else "-"
        lines.append(
            f"{r.size:<10} {_ms(e.text_encode_s):>8} {_ms(e.step_s):>9} {_ms(e.decode_s):>10} {_ms(e.png_s):>7} "
            f"{_ms(e.end_to_end_s):>9} {_ms(d.step_s if d else None):>15} {_ms(d.end_to_end_s if d else None):>14} {ratio:>6}"
        )
    return "\n".join(lines)


def write_chart(results: list[SizeResult], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r.engine is not None]
    if not ran:
        return
    sizes = [r.size for r in ran]
    x = range(len(sizes))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, attr, label in ((axes[0], "step_s", "one denoising step (ms)"), (axes[1], "end_to_end_s", "end to end (ms)")):
        engine = [getattr(r.engine, attr) * 1000 for r in ran]
        diffusers = [getattr(r.diffusers, attr) * 1000 if r.diffusers else 0 for r in ran]
        width = 0.4 if any(diffusers) else 0.8
        ax.bar([i - (width / 2 if any(diffusers) else 0) for i in x], engine, width, label="Kiln engine")
        if any(diffusers):
            ax.bar([i + width / 2 for i in x], diffusers, width, label="diffusers (PyTorch)")
        ax.set_xticks(list(x), sizes)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from engine.manifest import read_manifest
    from engine.pipeline import Pipeline
    from engine.sessions import RuntimeOptions
    from engine.shapes import parse_size, render_size

    if args.package:
        package, checkpoint, label = Path(args.package), Path(args.checkpoint) if args.checkpoint else None, args.label
        label = label or package.parent.name
    else:
        package, checkpoint, label = default_workload()
        checkpoint = Path(args.checkpoint) if args.checkpoint else checkpoint
        label = args.label or label
    manifest = read_manifest(package)
    device = "cpu" if manifest.target in CPU_TARGETS else "cuda"
    sizes = [s.strip() for s in (args.sizes or ",".join(SEED_SIZES)).split(",") if s.strip()]
    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)

    pipe = Pipeline(package, RuntimeOptions(threads=args.threads))
    results: list[SizeResult] = []
    for size in sizes:
        width, height = parse_size(size, param="--sizes")
        result = SizeResult(size=size)
        results.append(result)
        try:
            pipe.resolve(_request(width, height, steps))
        except Exception as e:  # a size this package does not take (limits, TensorRT profiles)
            result.skipped = f"skipped: {e}"
            continue
        result.skipped = None if args.no_memory_check else fits(package, manifest, width, height, device)
        if result.skipped:
            log.warning("%s %s", size, result.skipped)
            continue
        log.info("engine %s: %d steps, %d timed image(s) after one warm-up", size, steps, repeats)
        result.engine = time_engine(pipe, width, height, steps, repeats)
    del pipe

    use_diffusers = not args.no_diffusers and checkpoint is not None and _torch_ready(device)
    if use_diffusers:
        dpipe = load_diffusers(checkpoint, "euler", device)
        guidance = manifest.defaults.guidance_scale
        for result in results:
            if result.engine is None:
                continue
            width, height = parse_size(result.size)
            # A model with render_max_side is drawn smaller and upscaled by the engine: diffusers
            # draws at that size too, the same denoising work (natively it would be far slower).
            drawn = render_size(width, height, manifest.sizes)
            if drawn != (width, height):
                width, height = drawn
                result.notes.append(f"diffusers drew {width}x{height}, the size the engine draws before upscaling")
            log.info("diffusers %s (drawn at %dx%d)", result.size, width, height)
            try:
                result.diffusers = time_diffusers(dpipe, width, height, steps, guidance, repeats, device)
            except Exception as e:  # out of memory in PyTorch, say: keep the engine's numbers
                result.notes.append(f"diffusers failed: {type(e).__name__}: {e}")
        del dpipe
    elif not args.no_diffusers:
        log.info("diffusers not compared (%s)", "no checkpoint" if checkpoint is None else "torch not available for this device")

    report = {
        "workload": label,
        "package": str(package),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "target": manifest.target,
        "precision": manifest.precision,
        "family": manifest.family,
        "steps": steps,
        "sampler": "euler",
        "guidance_scale": manifest.defaults.guidance_scale,
        "threads": args.threads,
        "diffusers": ("PyTorch fp16, SDPA, CUDA" if device == "cuda" else "PyTorch fp32, CPU") if use_diffusers else None,
        "machine": machine_info(device),
        "sizes": [asdict(r) for r in results],
    }
    return report


def _request(width: int, height: int, steps: int):
    from engine.pipeline import ImageRequest

    return ImageRequest(prompt=PROMPT, width=width, height=height, seed=0, steps=steps, sampler="euler")


def _torch_ready(device: str) -> bool:
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:
        return False
    return device == "cpu" or torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="model package folder (default: the bundled model's, else tiny SD1)")
    parser.add_argument("--checkpoint", help="its diffusers checkpoint, for the diffusers comparison")
    parser.add_argument("--label", help="workload name in the results (default: the package's name)")
    parser.add_argument("--sizes", help=f"comma-separated WxH (default: {','.join(SEED_SIZES)})")
    parser.add_argument("--steps", type=int, help="denoising steps per image (default 20; --quick: 4)")
    parser.add_argument("--repeats", type=int, help="timed images per size after the warm-up (default 3; --quick: 1)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime/torch CPU threads (0: their default)")
    parser.add_argument("--quick", action="store_true", help="small run: 4 steps, 1 timed image")
    parser.add_argument("--no-diffusers", action="store_true", help="time the engine only")
    parser.add_argument("--no-memory-check", action="store_true", help="run every size even if it may not fit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass

    report = run(args)
    results = [_result_from_dict(d) for d in report["sizes"]]
    device = "cpu" if report["target"] in CPU_TARGETS else "cuda"
    title = (
        f"{report['workload']} ({report['target']}, {report['precision']}), {report['steps']} euler steps, "
        f"CFG {report['guidance_scale']:g}; medians, warm-up excluded"
    )
    print(f"\n{title}\n{report['machine'].get('gpu') or report['machine']['cpu']}")
    print(format_table(results))
    for r in results:
        for note in r.notes:
            print(f"  {r.size}: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"latency_per_size_{report['workload']}_{device}{'_quick' if args.quick else ''}"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2))
    write_chart(results, title, args.out / f"{stem}.png")
    print(f"wrote {json_path} and {stem}.png")
    return 0


def _result_from_dict(d: dict) -> SizeResult:
    return SizeResult(
        size=d["size"],
        engine=Timing(**d["engine"]) if d["engine"] else None,
        diffusers=Timing(**d["diffusers"]) if d["diffusers"] else None,
        skipped=d["skipped"],
        notes=d["notes"],
    )


if __name__ == "__main__":
    sys.exit(main())
