"""With LoRAs, the engine draws the image diffusers draws with the same LoRA files.

Tiny sd1 and sdxl checkpoints; LoRAs of random non-zero weights written in both file layouts
(kohya and diffusers/PEFT) by tests/test_lora_files.py's writers, stored with a copy of the
package (`add_lora`) on the engine side and loaded with `load_lora_weights` on the diffusers
side. diffusers applies a scale with `set_adapters`, which sets each adapter's weight in the UNet
and in both text encoders (PEFT's unfused `base(x) + scale * alpha/r * B(A(x))`; the engine fuses
W + scale * delta, the same sum in another order). The rest is tests/test_engine_parity.py's
set-up: the same request, euler, the engine's seed rule's latents handed to diffusers, and its
tolerance of 2/255 on uint8 pixels.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

from engine.lora import add_lora  # noqa: E402
from engine.pipeline import Pipeline, initial_noise  # noqa: E402
from engine.request import ImageRequest, LoraChoice  # noqa: E402
from export.diffusers_reference import reference_pipeline  # noqa: E402
from tests.test_engine_parity import run_diffusers  # noqa: E402
from tests.test_lora_files import _random_pairs, write_diffusers, write_kohya  # noqa: E402

TOLERANCE = 2  # uint8 levels, as tests/test_engine_parity.py
# One alpha for every module: diffusers' kohya converter fuses a text encoder out_proj with the
# most common alpha rather than its own (see test_lora_files.py). With factors of 0.1 * randn and
# rank 4, alpha 16 makes deltas 0.4 to 1.2 times the spread of the tiny models' weights.
ALPHA = 16.0
# A LoRA must move the image's pixels by more on average than parity allows at any one pixel
# (seen: 4.5 to 8.5 levels, up to 111 at one pixel), or parity would hold without applying it.
MIN_CHANGE = TOLERANCE


def request(family: str, *loras: LoraChoice) -> ImageRequest:
    return ImageRequest(
        prompt="a red circle on a blue background",
        negative_prompt="blurry" if family != "sdxl" else "",
        width=64,
        height=96,
        seed=1234,
        steps=6,
        guidance_scale=5.0,
        sampler="euler",
        loras=loras,
    )


class Side:
    """One family's two sides: the engine on a package copy holding the LoRAs, and a diffusers
    pipeline holding the same files as adapters of the same names."""

    def __init__(self, family: str, checkpoint: Path, package: Path, folder: Path):
        self.family = family
        self.diffusers = reference_pipeline(checkpoint, "euler")
        # Drawn before any adapter is loaded: _random_pairs finds the plain Linear/Conv2d modules.
        style = _random_pairs(self.diffusers, seed=1, alpha=ALPHA)
        files = {
            "kohya": write_kohya(style, folder / "kohya.safetensors", family),
            "diffusers": write_diffusers(style, folder / "diffusers.safetensors"),
            "other": write_diffusers(_random_pairs(self.diffusers, seed=2, alpha=ALPHA), folder / "other.safetensors"),
        }
        copy = folder / "package"
        shutil.copytree(package, copy)  # the shared tiny package is left as it is
        with warnings.catch_warnings():
            # PEFT warns that a model holding one adapter gets another: three are loaded on purpose.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
            for name, path in files.items():
                add_lora(copy, path, name)
                self.diffusers.load_lora_weights(str(path), adapter_name=name)
        self.engine = Pipeline(copy)  # reads the stored LoRAs as it starts
        self._base: np.ndarray | None = None

    def engine_image(self, *loras: LoraChoice) -> np.ndarray:  # (H, W, 3) uint8
        return self.engine.generate([request(self.family, *loras)])[0]

    @property
    def base_image(self) -> np.ndarray:
        if self._base is None:
            self._base = self.engine_image()
        return self._base

    def diffusers_image(self, *loras: LoraChoice) -> np.ndarray:  # (H, W, 3) uint8
        """diffusers with only `loras`' adapters active, at their scales, from the engine's noise."""
        req = request(self.family)
        self.diffusers.set_adapters([c.name for c in loras], adapter_weights=[c.scale for c in loras])
        noise, _ = initial_noise(req.seed, (4, req.height // 8, req.width // 8))
        return run_diffusers(self.diffusers, req, noise)


@pytest.fixture(scope="module")
def side(tiny_checkpoint, tiny_package, tmp_path_factory):
    made: dict[str, Side] = {}

    def get(family: str) -> Side:
        if family not in made:
            folder = tmp_path_factory.mktemp(f"lora-parity-{family}")
            made[family] = Side(family, tiny_checkpoint(family), tiny_package(family), folder)
        return made[family]

    return get


def assert_matches(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape == (96, 64, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= TOLERANCE, f"max abs difference {diff} > {TOLERANCE} levels"


def change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in uint8 levels."""
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_engine_with_a_lora_matches_diffusers(side, family, layout, scale):
    s = side(family)
    lora = LoraChoice(name=layout, scale=scale)
    ours = s.engine_image(lora)
    assert_matches(ours, s.diffusers_image(lora))
    assert change(ours, s.base_image) > MIN_CHANGE, "the LoRA barely changes the image: parity would say nothing"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_loras_at_once_match_diffusers_with_both_adapters(side, family):
    """A kohya file at 0.5 and a diffusers-layout one at 1.0; diffusers has both adapters active."""
    s = side(family)
    loras = (LoraChoice(name="kohya", scale=0.5), LoraChoice(name="other", scale=1.0))
    ours = s.engine_image(*loras)
    assert_matches(ours, s.diffusers_image(*loras))
    for one in loras:
        assert change(ours, s.engine_image(one)) > MIN_CHANGE, f"{one.name} alone draws the same image"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_scale_zero_draws_the_base_image_bit_for_bit(side, family):
    s = side(family)
    np.testing.assert_array_equal(s.engine_image(LoraChoice(name="kohya", scale=0.0)), s.base_image)
