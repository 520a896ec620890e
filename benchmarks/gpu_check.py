"""The GPU check: one run on a GPU machine for everything the CUDA target must show.

    python3 -m benchmarks.gpu_check --out DIR          # on the GPU machine (gpu_check.sh runs it)
    python -m benchmarks.gpu_check --dry-run-cpu       # here: the same steps on the tiny model

Steps, each logged with its time (full log, JSON, parity image and chart under --out; a short
table printed last):
  1. environment: GPU, driver, versions; refuses to go on without CUDAExecutionProvider;
  2. the SD 1.5 architecture with random weights (export/architectures/sd15; timing does not
     depend on weight values, never time on zeros), exported as a cpu fp32 package, and the cuda
     fp16 package derived from its graphs (the optimise step of `kiln export --target cuda`);
  3. parity: the same request (seed, sampler, steps, size) through the cuda fp16 package on the
     GPU and the cpu fp32 package on the CPU; PSNR of the uint8 images, PASS at >= 30 dB and no
     NaN. For scale, diffusers fp16 and fp32 on the GPU from the same starting noise against the
     same CPU image (what fp16 costs PyTorch on these random weights);
  4. latency per size (text encoding, one CFG step, VAE decode, PNG, end to end; medians,
     warm-up excluded) for IOBinding + CUDA graphs, IOBinding alone, and plain session.run (at
     512x512), with the share of a step spent copying latents between host and device;
  5. diffusers PyTorch fp16 (SDPA) on the same work, and the ratio;
  6. TensorRT: run only if `tensorrt` is importable (it is not on the machines we reach).
A time budget (--budget-s) skips the later, optional measurements rather than overrun.

The dry run (--dry-run-cpu) does every step on the tiny SD1 test model on this CPU: the cuda
package is still made (graph surgery runs anywhere), but its fused graphs need CUDA, so the
"cuda" timings and parity use the same IOBinding code on the CPU execution provider instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.latency_per_size import SEED_SIZES, fits, load_diffusers, machine_info, time_diffusers, time_engine

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
PSNR_THRESHOLD_DB = 30.0
GOAL_STEP_MS_512 = 8.0  # the issue's goal on an H100: a 512x512 CFG step
GOAL_RATIO_E2E = 1.5  # and at least 1.5x diffusers fp16 end to end

log = logging.getLogger("gpu_check")


class Budget:
    """Wall-clock budget: later, optional steps are skipped (with a note) once it is spent."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str, needs_s: float = 0.0) -> bool:
        if self.elapsed + needs_s <= self.seconds:
            return True
        self.skipped.append(f"{what} (budget: {self.elapsed:.0f}s of {self.seconds:.0f}s spent)")
        log.warning("skipping %s: out of time budget", what)
        return False


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- the workload ---------------------------------------------------------------------------


def build_packages(args, report: dict) -> tuple[Path, Path, Path]:
    """(checkpoint, cpu package, cuda package), made or reused under args.work."""
    from export.cuda_fp16 import derive_cuda_package
    from export.package import build_package
    from export.random_checkpoint import build_random_checkpoint

    if args.dry_run_cpu:
        architecture, name = ROOT / "tests" / "assets" / "tiny" / "sd1", "tiny-sd1"
    else:
        architecture, name = ROOT / "export" / "architectures" / "sd15", "sd15-random"
    checkpoint = Path(args.checkpoint) if args.checkpoint else args.work / "checkpoints" / name
    timings = report.setdefault("export_s", {})
    t0 = time.perf_counter()
    if not (checkpoint / "model_index.json").is_file():
        build_random_checkpoint(architecture, checkpoint, seed=0)
    timings["random checkpoint"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpu = build_package(checkpoint, args.work, target="cpu", name=name)
    timings["cpu fp32 package"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cuda = derive_cuda_package(cpu, args.work / name / "cuda")
    timings["cuda fp16 package"] = time.perf_counter() - t0
    report["workload"] = {"architecture": str(architecture.relative_to(ROOT)), "checkpoint": str(checkpoint),
                          "cpu_package": str(cpu), "cuda_package": str(cuda)}
    return checkpoint, cpu, cuda


def cuda_pipeline(package: Path, dry_run: bool, **gpu_options):
    """The cuda runtime on the GPU; in a dry run the same binding code over the cpu package."""
    from engine.pipeline import Pipeline
    from engine.sessions import GpuOptions, RuntimeOptions

    options = RuntimeOptions(gpu=GpuOptions(**gpu_options))
    if dry_run:
        from engine.cuda.pipeline import BoundPipeline

        cpu_package = package.parent / "cpu"
        return BoundPipeline(cpu_package, options) if gpu_options.get("io_binding", True) else Pipeline(cpu_package, options)
    return Pipeline(package, options)  # the manifest's target picks CudaPipeline


# ---- 3. parity ------------------------------------------------------------------------------


def parity_request(args):
    from engine.pipeline import ImageRequest
    from engine.shapes import parse_size

    width, height = parse_size(args.parity_size)
    return ImageRequest(prompt=PROMPT, width=width, height=height, seed=7, steps=args.parity_steps, sampler="euler")


def cpu_reference(args, cpu: Path) -> tuple[np.ndarray, float]:
    """The cpu fp32 package's image for the parity request, and the seconds it took; kept in
    --work with the package's digest, so the background export can make it before the GPU part."""
    from engine.manifest import read_manifest
    from engine.pipeline import Pipeline
    from engine.sessions import RuntimeOptions

    req = parity_request(args)
    digest = read_manifest(cpu).source_digest[:12]
    path = args.work / f"reference_{digest}_{req.width}x{req.height}_{req.steps}steps_seed{req.seed}.npz"
    if path.is_file():
        saved = np.load(path)
        return saved["image"], float(saved["seconds"])
    t0 = time.perf_counter()
    image = Pipeline(cpu, RuntimeOptions()).generate([req])[0]
    seconds = time.perf_counter() - t0
    np.savez(path, image=image, seconds=seconds)
    return image, seconds


def parity(args, checkpoint: Path, cpu: Path, cuda: Path, report: dict) -> bool:
    from engine.pipeline import initial_noise
    from engine.shapes import latent_shape

    req = parity_request(args)
    width, height = req.width, req.height
    reference, cpu_s = cpu_reference(args, cpu)
    pipe = cuda_pipeline(cuda, args.dry_run_cpu)
    try:
        image = pipe.generate([req])[0]
        finite = True
    except Exception as e:  # NonFiniteOutputError among others: recorded, and parity fails
        log.error("the cuda package failed the parity request: %s", e)
        image, finite = np.zeros_like(reference), False
    manifest = pipe.manifest
    del pipe
    gc.collect()
    result = {
        "size": args.parity_size, "steps": args.parity_steps, "seed": req.seed, "sampler": "euler",
        "cpu_fp32_seconds": cpu_s, "psnr_db": psnr(image, reference), "threshold_db": PSNR_THRESHOLD_DB,
        "max_abs_diff": int(np.abs(image.astype(int) - reference.astype(int)).max()), "finite": finite,
    }
    result["pass"] = finite and result["psnr_db"] >= PSNR_THRESHOLD_DB
    images = [("engine cpu fp32", reference), ("engine cuda fp16", image)]
    if args.diffusers and _torch_device(args) is not None:
        # diffusers from the same starting noise (the README's seed rule), fp16 and fp32
        import torch

        from export.diffusers_reference import reference_pipeline

        device = _torch_device(args)
        noise, _rng = initial_noise(req.seed, latent_shape(width, height, manifest.latent_channels, manifest.vae_scale_factor))
        for label, dtype in (("diffusers fp16", torch.float16), ("diffusers fp32", torch.float32)):
            if device == "cpu" and dtype == torch.float16:
                continue
            dpipe = reference_pipeline(str(checkpoint), "euler").to(device, dtype)
            with torch.inference_mode():
                out = dpipe(prompt=PROMPT, width=width, height=height, num_inference_steps=args.parity_steps,
                            guidance_scale=manifest.defaults.guidance_scale, output_type="np",
                            latents=torch.from_numpy(noise[None]).to(device, dtype))
            pixels = (np.nan_to_num(out.images[0]) * 255).round().clip(0, 255).astype(np.uint8)
            result[f"psnr_{label.replace(' ', '_')}_vs_cpu_fp32_db"] = psnr(pixels, reference)
            images.append((label, pixels))
            del dpipe
            _free_torch()
    report["parity"] = result
    _write_parity_image(images, args.out / "parity.png")
    log.info("parity: PSNR %.1f dB (threshold %.0f dB) -> %s", result["psnr_db"], PSNR_THRESHOLD_DB, "PASS" if result["pass"] else "FAIL")
    return result["pass"]


def _write_parity_image(images: list[tuple[str, np.ndarray]], path: Path) -> None:
    from PIL import Image, ImageDraw

    h, w = images[0][1].shape[:2]
    canvas = Image.new("RGB", (w * len(images), h + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (label, pixels) in enumerate(images):
        canvas.paste(Image.fromarray(pixels), (k * w, 16))
        draw.text((k * w + 2, 2), label, fill="black")
    canvas.save(path)


# ---- 4. and 5. latency ----------------------------------------------------------------------


VARIANTS = {  # name -> (GpuOptions fields, sizes: "all" or a list)
    "IOBinding + CUDA graphs": ({"io_binding": True, "cuda_graphs": 8}, "all"),
    "IOBinding": ({"io_binding": True, "cuda_graphs": 0}, "all"),
    "session.run": ({"io_binding": False, "cuda_graphs": 0}, ["512x512"]),
}


def latency(args, checkpoint: Path, cuda: Path, budget: Budget, report: dict) -> None:
    from engine.manifest import read_manifest
    from engine.shapes import parse_size

    sizes = args.sizes.split(",")
    manifest = read_manifest(cuda)
    rows = report.setdefault("latency", {})
    device = "cpu" if args.dry_run_cpu else "cuda"
    order = ["IOBinding + CUDA graphs", "diffusers fp16", "IOBinding", "session.run"]
    for name in order:
        if name == "diffusers fp16":
            diffusers_latency(args, checkpoint, sizes, manifest.defaults.guidance_scale, budget, rows)
            continue
        gpu_options, variant_sizes = VARIANTS[name]
        variant_sizes = sizes if variant_sizes == "all" else [s for s in variant_sizes if s in sizes] or sizes[:1]
        if not budget.allows(f"engine {name}", needs_s=20):
            continue
        pipe = cuda_pipeline(cuda, args.dry_run_cpu, **gpu_options)
        refusals = getattr(pipe, "graph_refusals", {})
        for size in variant_sizes:
            width, height = parse_size(size)
            entry = rows.setdefault(size, {})
            note = fits(cuda if not args.dry_run_cpu else cuda.parent / "cpu", manifest, width, height, device)
            if note:
                entry[name] = {"skipped": note}
                continue
            if not budget.allows(f"engine {name} at {size}"):
                entry[name] = {"skipped": "time budget"}
                continue
            stats = getattr(pipe.unet, "stats", None)
            try:
                timing = time_engine(pipe, width, height, args.steps, args.repeats,
                                     after_warmup=stats.reset if stats is not None else None)
            except Exception as e:  # out of GPU memory at a large size, say: note it, go on
                log.error("engine %s at %s failed: %s", name, size, e)
                entry[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
            entry[name] = asdict(timing)
            if stats is not None and stats.runs:
                copy_s = (stats.copy_in_s + stats.copy_out_s) / stats.runs
                run_s = stats.run_s / stats.runs
                entry[name].update(
                    unet_run_ms=1000 * run_s, copy_us=1e6 * copy_s, copy_share_of_step=copy_s / timing.step_s,
                    # the rest of a step: batching the rows, guidance and the sampler, on the host
                    host_us=1e6 * max(timing.step_s - run_s - copy_s, 0.0),
                    uploads_skipped=stats.uploads_skipped, graph_runs=stats.graph_runs, runs=stats.runs,
                )
            if refusals:
                entry[name]["cuda_graph_refusals"] = refusals
            log.info("engine %s %s: step %.2f ms, end to end %.1f ms", name, size, timing.step_s * 1e3, timing.end_to_end_s * 1e3)
        del pipe
        gc.collect()


def diffusers_latency(args, checkpoint: Path, sizes: list[str], guidance: float, budget: Budget, rows: dict) -> None:
    from engine.shapes import parse_size

    device = _torch_device(args)
    if not args.diffusers or device is None:
        return
    if not budget.allows("diffusers fp16", needs_s=30):
        return
    label = "diffusers fp16" if device == "cuda" else "diffusers fp32"  # the row is "diffusers fp16" either way
    pipe = load_diffusers(checkpoint, "euler", device)
    for size in sizes:
        width, height = parse_size(size)
        entry = rows.setdefault(size, {})
        if not budget.allows(f"{label} at {size}"):
            entry["diffusers fp16"] = {"skipped": "time budget"}
            continue
        try:
            entry["diffusers fp16"] = asdict(time_diffusers(pipe, width, height, args.steps, guidance, args.repeats, device))
            entry["diffusers fp16"]["label"] = label
        except Exception as e:  # out of memory at 1792x1024, say
            log.error("%s at %s failed: %s", label, size, e)
            entry["diffusers fp16"] = {"error": f"{type(e).__name__}: {e}"}
            _free_torch()
    del pipe
    _free_torch()


def _torch_device(args) -> str | None:
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:
        return None
    if args.dry_run_cpu:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def _free_torch() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- 6. TensorRT ----------------------------------------------------------------------------


def tensorrt_status() -> str:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed here: TensorRT engines were not built or run (only their unit tests ran, on CPU)"
    return "tensorrt is installed here, but this check does not build engines yet: run `make export TARGET=tensorrt` by hand"


# ---- the table ------------------------------------------------------------------------------


def _ms(entry: dict | None, key: str) -> str:
    if not entry or key not in entry:
        return "-" if not entry or "skipped" not in entry else "skip"
    return f"{entry[key] * 1000:.1f}"


def summary(report: dict) -> str:
    lines = []
    env = report.get("environment", {})
    lines.append(f"GPU check {env.get('date', '')} on {env.get('gpu') or env.get('cpu')}"
                 f"{' (DRY RUN on CPU: tiny model, CPU execution provider)' if report.get('dry_run') else ''}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()))
    p = report.get("parity")
    if p:
        extra = "; ".join(f"{k[5:-3].replace('_', ' ')} {v:.1f} dB" for k, v in p.items() if k.startswith("psnr_") and k != "psnr_db")
        lines.append(f"parity {p['size']}, {p['steps']} euler steps, seed {p['seed']}: cuda fp16 vs cpu fp32 PSNR "
                     f"{p['psnr_db']:.1f} dB (threshold {p['threshold_db']:.0f} dB), max |diff| {p['max_abs_diff']}/255, "
                     f"{'finite' if p['finite'] else 'NaN/inf'} -> {'PASS' if p['pass'] else 'FAIL'}" + (f"  [{extra}]" if extra else ""))
    rows = report.get("latency", {})
    if rows:
        head = f"{'size':<10} {'graphs step':>11} {'graphs e2e':>10} {'bind step':>9} {'bind e2e':>9} {'run() step':>10} {'diffusers step':>14} {'diffusers e2e':>13} {'x e2e':>6} {'copy %':>6}"
        lines.append(f"latency, ms (medians; {report.get('steps')} steps, CFG, warm-up excluded):")
        lines.append(head)
        for size, entry in rows.items():
            g, b, r, d = (entry.get(k) for k in ("IOBinding + CUDA graphs", "IOBinding", "session.run", "diffusers fp16"))
            best = min((e["end_to_end_s"] for e in (g, b, r) if e and "end_to_end_s" in e), default=None)
            ratio = f"{d['end_to_end_s'] / best:.2f}" if best and d and "end_to_end_s" in d else "-"
            share = next((e.get("copy_share_of_step") for e in (g, b) if e and "copy_share_of_step" in e), None)
            lines.append(
                f"{size:<10} {_ms(g, 'step_s'):>11} {_ms(g, 'end_to_end_s'):>10} {_ms(b, 'step_s'):>9} {_ms(b, 'end_to_end_s'):>9} "
                f"{_ms(r, 'step_s'):>10} {_ms(d, 'step_s'):>14} {_ms(d, 'end_to_end_s'):>13} {ratio:>6} "
                f"{'-' if share is None else f'{share * 100:.1f}':>6}"
            )
    goals = report.get("goals")
    if goals:
        lines.append("goals (H100): " + "; ".join(goals))
    lines.append(f"tensorrt: {report.get('tensorrt')}")
    for note in report.get("skipped", []):
        lines.append(f"skipped: {note}")
    for what, err in report.get("errors", {}).items():
        lines.append(f"ERROR in {what}: {err.splitlines()[-1] if err else ''}")
    return "\n".join(lines)


def goals(report: dict) -> list[str]:
    entry = report.get("latency", {}).get("512x512", {})
    steps = [e["step_s"] for k, e in entry.items() if k != "diffusers fp16" and isinstance(e, dict) and "step_s" in e]
    e2e = [e["end_to_end_s"] for k, e in entry.items() if k != "diffusers fp16" and isinstance(e, dict) and "end_to_end_s" in e]
    out = []
    if steps:
        best = min(steps) * 1000
        out.append(f"512x512 CFG step {best:.2f} ms (goal <= {GOAL_STEP_MS_512:g}) {'MET' if best <= GOAL_STEP_MS_512 else 'MISSED'}")
    d = entry.get("diffusers fp16")
    if e2e and d and "end_to_end_s" in d:
        ratio = d["end_to_end_s"] / min(e2e)
        out.append(f"{ratio:.2f}x diffusers end to end (goal >= {GOAL_RATIO_E2E:g}x) {'MET' if ratio >= GOAL_RATIO_E2E else 'MISSED'}")
    return out


def write_chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.get("latency", {})
    names = ["IOBinding + CUDA graphs", "IOBinding", "session.run", "diffusers fp16"]
    sizes = list(rows)
    if not sizes:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.2
    for ax, key, label in ((axes[0], "step_s", "one CFG step (ms)"), (axes[1], "end_to_end_s", "end to end (ms)")):
        for k, name in enumerate(names):
            values = [rows[s].get(name, {}).get(key, 0) * 1000 for s in sizes]
            if any(values):
                ax.bar([i + (k - 1.5) * width for i in range(len(sizes))], values, width, label=name)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"Kiln GPU check: {report.get('environment', {}).get('gpu', 'dry run')}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=None, help="logs and results (default: build/gpu-check/<date>)")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and packages (default: build/gpu-check)")
    parser.add_argument("--checkpoint", help="an existing random-weight checkpoint to use")
    parser.add_argument("--sizes", default=",".join(SEED_SIZES))
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per timed image")
    parser.add_argument("--repeats", type=int, default=2, help="timed images per size after one warm-up")
    parser.add_argument("--parity-size", default="512x512")
    parser.add_argument("--parity-steps", type=int, default=10)
    parser.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    parser.add_argument("--budget-s", type=float, default=480, help="skip optional steps past this many seconds")
    parser.add_argument("--dry-run-cpu", action="store_true", help="every step on the tiny model on this CPU")
    parser.add_argument("--export-only", action="store_true",
                        help="make the checkpoint and packages and stop (gpu_check.sh starts this early, in the background)")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        if args.sizes == ",".join(SEED_SIZES):
            args.sizes = "64x64,128x128"
        args.parity_size = "64x64" if args.parity_size == "512x512" else args.parity_size
        args.steps, args.repeats = min(args.steps, 3), 1
        args.parity_steps = min(args.parity_steps, 3)
    args.work = args.work or ROOT / "build" / ("gpu-check-dry" if args.dry_run_cpu else "gpu-check")
    args.out = args.out or args.work / time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    file_log = logging.FileHandler(args.out / "gpu_check.log")  # every logger's record, the exports' too
    file_log.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(file_log)
    try:
        return _run(args)
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()


def _run(args) -> int:
    budget = Budget(args.budget_s)
    report: dict = {"dry_run": args.dry_run_cpu, "steps": args.steps, "repeats": args.repeats, "errors": {}}
    status = 0

    if args.export_only:  # no GPU needed: the packages are made on the CPU
        try:
            _checkpoint, cpu, _cuda = build_packages(args, report)
            log.info("packages made in %.0fs: %s", budget.elapsed, report["export_s"])
            cpu_reference(args, cpu)
            log.info("cpu fp32 reference image made; %.0fs in all", budget.elapsed)
        except Exception:
            log.exception("making the packages failed")
            return 1
        return 0

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and not args.dry_run_cpu:
        ort.preload_dlls()
    report["environment"] = machine_info("cpu" if args.dry_run_cpu else "cuda")
    providers = ort.get_available_providers()
    log.info("onnxruntime %s providers: %s", ort.__version__, providers)
    if not args.dry_run_cpu and "CUDAExecutionProvider" not in providers:
        log.error("onnxruntime here has no CUDAExecutionProvider (%s): install onnxruntime-gpu first (GPU.md)", providers)
        return 2
    report["tensorrt"] = tensorrt_status()

    try:
        checkpoint, cpu, cuda = build_packages(args, report)
    except Exception:
        report["errors"]["packages"] = traceback.format_exc()
        log.exception("making the packages failed")
        _finish(args, report, budget)
        return 1
    for what, run in (
        ("parity", lambda: parity(args, checkpoint, cpu, cuda, report)),
        ("latency", lambda: latency(args, checkpoint, cuda, budget, report)),
    ):
        t0 = time.perf_counter()
        try:
            ok = run()
            if ok is False:
                status = 1
        except Exception:
            report["errors"][what] = traceback.format_exc()
            log.exception("%s failed", what)
            status = 1
        log.info("%s done in %.0fs (%.0fs of the budget)", what, time.perf_counter() - t0, budget.elapsed)
    _finish(args, report, budget)
    return status


def _finish(args, report: dict, budget: Budget) -> None:
    report["goals"] = goals(report)
    report["skipped"] = budget.skipped
    report["wall_s"] = budget.elapsed
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    try:
        write_chart(report, args.out / "latency.png")
    except Exception as e:  # a chart is not worth failing the run over
        log.warning("no chart: %s", e)
    table = summary(report)
    (args.out / "summary.txt").write_text(table + "\n")
    log.info("results in %s (gpu_check.log, gpu_check.json, summary.txt, parity.png, latency.png)", args.out)
    print("\n" + table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
