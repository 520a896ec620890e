"""The latency-per-size benchmark: stage timings, the memory estimate that skips sizes, the table."""

from __future__ import annotations

import json

import pytest

from benchmarks import latency_per_size as bench
from engine.manifest import read_manifest
from engine.pipeline import Pipeline
from engine.sessions import RuntimeOptions


def test_engine_timing_has_every_stage(tiny_package):
    pipe = Pipeline(tiny_package("sd1"), RuntimeOptions(threads=1))
    timing = bench.time_engine(pipe, 64, 64, steps=2, repeats=1)
    assert timing.step_samples == 2
    for stage in (timing.text_encode_s, timing.step_s, timing.decode_s, timing.png_s):
        assert 0 < stage < timing.end_to_end_s


def test_largest_activation_grows_with_the_square_of_the_tokens(tiny_package):
    """The tiny UNet attends at full latent resolution: its score matrix is (B*heads, N, N)."""
    package = tiny_package("sd1")
    manifest = read_manifest(package)
    small = bench.estimated_peak_bytes(package, manifest, 256, 256)["unet"]
    large = bench.estimated_peak_bytes(package, manifest, 512, 512)["unet"]
    assert large == pytest.approx(16 * small, rel=0.01)


def test_a_size_that_cannot_fit_is_skipped_with_the_reason(tiny_package, monkeypatch):
    package = tiny_package("sd1")
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: 2**30)
    note = bench.fits(package, read_manifest(package), 1024, 1024, "cpu")
    assert note.startswith("skipped: unet at 1024x1024 needs about")
    assert "1.0 GiB available" in note
    assert bench.fits(package, read_manifest(package), 64, 64, "cpu") is None


def test_quick_run_writes_json_and_chart(tiny_package, tmp_path):
    package = tiny_package("sd1")
    bench.main(["--package", str(package), "--sizes", "64x64,64x70", "--quick", "--no-diffusers", "--threads", "1",
                "--out", str(tmp_path), "--label", "t"])
    report = json.loads((tmp_path / "latency_per_size_t_cpu_quick.json").read_text())
    assert [s["size"] for s in report["sizes"]] == ["64x64", "64x70"]
    assert report["sizes"][1]["skipped"].startswith("skipped: height 70 is not a multiple of 8")
    assert report["machine"]["versions"]["onnxruntime"]
    assert (tmp_path / "latency_per_size_t_cpu_quick.png").stat().st_size > 0
