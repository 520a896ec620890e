"""Engine behaviour beyond parity: batch independence, torch-free import, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from engine.errors import IncompatiblePackageError, InvalidRequestError, NonFiniteOutputError, PackageError, UnknownSamplerError
from engine.pipeline import ImageRequest, Pipeline

BASE = dict(prompt="a red circle on a blue background", width=64, height=64, seed=7, steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def sd1(tiny_package):
    return Pipeline(tiny_package("sd1"))


def test_importing_engine_does_not_import_torch():
    code = (
        "import sys; import engine.pipeline, engine.sessions, engine.samplers, engine.client.types; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'optimum') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"engine imported {done.stdout} {done.stderr}"


def test_each_image_in_a_batch_equals_the_image_alone(sd1):
    target = ImageRequest(**BASE)
    alone = sd1.generate([target])[0]
    others = [
        ImageRequest(**{**BASE, "prompt": "a green star", "seed": 99, "steps": 9, "guidance_scale": 2.0}),
        ImageRequest(**{**BASE, "prompt": "purple", "seed": 3, "steps": 2, "sampler": "euler_a"}),
        ImageRequest(**{**BASE, "width": 96, "seed": 5}),
        ImageRequest(**{**BASE, "guidance_scale": 1.0, "seed": 11}),
    ]
    batch = sd1.generate([others[0], target, *others[1:]])
    diff = np.abs(batch[1].astype(int) - alone.astype(int)).max()
    assert diff <= 2
    assert not np.array_equal(batch[0], alone)  # the other images really are different


def test_same_seed_same_pixels_different_seed_different_pixels(sd1):
    a, b = sd1.generate([ImageRequest(**BASE), ImageRequest(**BASE)])
    c = sd1.generate([ImageRequest(**{**BASE, "seed": 8})])[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "change,param,says",
    [
        ({"width": 60}, "size", "width 60 is not a multiple of 8 (try 56)"),
        ({"height": 4096}, "size", "height 4096 is outside this model's limits (64..2048)"),
        ({"steps": 0}, "steps", "steps must be between 1 and 150, got 0"),
        ({"steps": 10_000}, "steps", "steps must be between 1 and 150, got 10000"),
        ({"prompt": "   "}, "prompt", "the prompt is empty"),
        ({"guidance_scale": -1.0}, "guidance_scale", "guidance_scale must be between 0 and 50, got -1.0"),
        ({"seed": -5}, "seed", "got seed -5"),
    ],
)
def test_bad_parameters_are_refused_naming_the_parameter(sd1, change, param, says):
    with pytest.raises(InvalidRequestError) as err:
        sd1.generate([ImageRequest(**{**BASE, **change})])
    assert err.value.param == param
    assert says in str(err.value)


def test_unknown_sampler_lists_the_valid_ones(sd1):
    with pytest.raises(UnknownSamplerError, match="euler"):
        sd1.generate([ImageRequest(**{**BASE, "sampler": "plms"})])


def test_over_long_prompt_is_truncated_with_a_warning(sd1, caplog):
    image = sd1.generate([ImageRequest(**{**BASE, "prompt": "red " * 500})])[0]
    assert image.shape == (64, 64, 3)
    assert any("truncated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("prompt", ["🎈🦄", "日本語のテキスト", "!!!???", "x" * 3000, "a\nb\tc\u200b"])
def test_any_text_tokenizes(sd1, prompt):
    ids = sd1.tokenizers[0]([prompt])
    assert ids.shape == (1, 77)


def test_nan_output_is_reported_not_returned_black(sd1):
    [sample] = sd1.prepare([ImageRequest(**BASE)])
    sample.x[:] = np.nan
    [result] = sd1.decode([sample])
    assert isinstance(result, NonFiniteOutputError)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(PackageError, match="manifest.json is missing"):
        Pipeline(tmp_path)


def test_package_from_another_format_version_is_refused(tiny_package, tmp_path):
    copy = shutil.copytree(tiny_package("sd1"), tmp_path / "pkg")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompatiblePackageError, match="format 999"):
        Pipeline(copy)


def test_package_for_a_missing_provider_is_refused(tiny_package, tmp_path):
    copy = shutil.copytree(tiny_package("sd1"), tmp_path / "pkg")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompatiblePackageError, match="CUDAExecutionProvider"):
        Pipeline(copy)


def test_package_with_missing_tokenizer_is_refused(tiny_package, tmp_path):
    copy = shutil.copytree(tiny_package("sd1"), tmp_path / "pkg")
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match="tokenizer"):
        Pipeline(copy)


def test_sessions_per_resolution_share_one_copy_of_the_weights(sd1):
    sd1.generate([ImageRequest(**BASE), ImageRequest(**{**BASE, "width": 128})])
    assert len(sd1.unet.loaded_shapes) >= 2
    # Every initializer of weights.json is handed to the sessions from one mapping of weights.bin:
    # each array is a view into the same memmap, not a copy per session.
    weights = sd1.unet.weights
    index = json.loads((sd1.package / "unet" / "weights.json").read_text())
    assert set(weights.values) == set(index) and len(weights.arrays) == len(index)

    def root(array):
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array

    assert len({id(root(a)) for a in weights.arrays.values()}) == 1
    assert isinstance(root(next(iter(weights.arrays.values()))), np.memmap)


def test_sizes_over_render_max_side_are_drawn_smaller_and_upscaled(tiny_package, tmp_path):
    from engine.shapes import render_size

    copy = shutil.copytree(tiny_package("sd1"), tmp_path / "pkg")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sizes"]["render_max_side"] = 128
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline(copy)
    assert render_size(448, 256, pipe.manifest.sizes) == (128, 72)
    [sample] = pipe.prepare([ImageRequest(**{**BASE, "width": 448, "height": 256})])
    assert sample.shape == (4, 9, 16)  # drawn at 128x72
    image = pipe.generate([ImageRequest(**{**BASE, "width": 448, "height": 256})])[0]
    assert image.shape == (256, 448, 3)
