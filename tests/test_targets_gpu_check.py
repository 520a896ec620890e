"""The GPU check script, here without a GPU: its arithmetic, its table, and its CPU dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from benchmarks import gpu_check

from .conftest import ROOT


def test_help_runs_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0
    assert "--dry-run-cpu" in done.stdout


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert gpu_check.psnr(a, a) == math.inf
    b = a.copy()
    b[...] = 1  # MSE 1 -> 20 log10(255)
    assert gpu_check.psnr(a, b) == 20 * math.log10(255)


def test_budget_skips_and_says_so():
    budget = gpu_check.Budget(10)
    assert budget.allows("step one", needs_s=5)
    assert not budget.allows("step two", needs_s=60)
    assert budget.skipped[0].startswith("step two (budget:")


def test_summary_reports_goals_and_ratio():
    step = lambda s, e2e: {"step_s": s, "end_to_end_s": e2e}  # noqa: E731
    report = {
        "steps": 20,
        "environment": {"gpu": "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB, 9.0", "versions": {"onnxruntime-gpu": "1.31.1"}},
        "parity": {"size": "512x512", "steps": 10, "seed": 7, "psnr_db": 41.0, "threshold_db": 30.0, "max_abs_diff": 9,
                   "finite": True, "pass": True, "psnr_diffusers_fp16_vs_cpu_fp32_db": 39.5},
        "latency": {"512x512": {"IOBinding + CUDA graphs": {**step(0.0075, 0.21), "copy_share_of_step": 0.004},
                                "IOBinding": step(0.0081, 0.23), "diffusers fp16": step(0.012, 0.36)}},
        "tensorrt": "not installed",
    }
    report["goals"] = gpu_check.goals(report)
    table = gpu_check.summary(report)
    assert "PSNR 41.0 dB (threshold 30 dB)" in table and "PASS" in table
    assert "512x512 CFG step 7.50 ms (goal <= 8) MET" in table
    assert "1.71x diffusers end to end (goal >= 1.5x) MET" in table
    row = next(line for line in table.splitlines() if line.startswith("512x512"))
    assert row.split()[1:3] == ["7.5", "210.0"] and row.split()[-2:] == ["1.71", "0.4"]


def test_dry_run_on_cpu_makes_every_file(tmp_path, tiny_checkpoint):
    code = gpu_check.main(["--dry-run-cpu", "--no-diffusers", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--sizes", "64x64", "--checkpoint", str(tiny_checkpoint("sd1"))])
    assert code == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["parity"]["pass"] and report["errors"] == {}
    assert set(report["latency"]["64x64"]) == {"IOBinding + CUDA graphs", "IOBinding", "session.run"}
    assert report["latency"]["64x64"]["IOBinding"]["uploads_skipped"] > 0  # embeddings stayed put
    for name in ("gpu_check.log", "summary.txt", "parity.png", "latency.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "work" / "tiny-sd1" / "cuda" / "manifest.json").is_file()
