"""The bundled model keeps its meaning through the whole path: export -> engine -> image.

Shapes and colours are read back with the evaluator that scores the model
(export/default_model/evaluate_images.py); a handful of prompts at 256x256 keeps this within CI's time.
Both CPU targets: the onnxruntime cpu package, and the openvino package (bf16 on CPUs with it).
"""

from __future__ import annotations

import pytest

from export.default_model.evaluate_images import read_image
from kiln.default_model import DEFAULT_MODEL

pytest.importorskip("torch")

PROMPTS = [
    # prompt, background, shape colour
    ("a red circle on a blue background", "blue", "red"),
    ("a yellow square on a black background", "black", "yellow"),
    ("a big white star, green background", "green", "white"),
    ("a big purple triangle, orange background", "orange", "purple"),
]


@pytest.fixture(scope="module", params=["cpu", "openvino"])
def default_pipeline(request, tmp_path_factory):
    from engine.pipeline import Pipeline
    from export.package import build_package

    if request.param == "openvino":
        pytest.importorskip("openvino")
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        pytest.fail(f"the bundled model is missing from {DEFAULT_MODEL}")
    package = build_package(DEFAULT_MODEL, tmp_path_factory.mktemp("pkg"), target=request.param)
    return Pipeline(package)


def test_default_model_package_uses_v_prediction_and_trailing_ddim(default_pipeline):
    m = default_pipeline.manifest
    assert m.prediction_type == "v_prediction"
    assert m.scheduler_config.get("rescale_betas_zero_snr") is True
    assert (m.defaults.sampler, m.defaults.steps) == ("ddim", 20)


@pytest.mark.parametrize("prompt,background,colour", PROMPTS)
def test_default_model_draws_the_colours_it_is_asked_for(default_pipeline, prompt, background, colour):
    from engine.pipeline import ImageRequest

    image = default_pipeline.generate([ImageRequest(prompt=prompt, width=256, height=256, seed=11)])[0]
    reading = read_image(image)
    assert reading.background == background, f"{prompt!r}: read {reading}"
    assert reading.colour == colour, f"{prompt!r}: read {reading}"


SHAPES = {
    "a red circle on a blue background": "circle",
    "a yellow square on a black background": "square",
    "a big white star, green background": "star",
    "a big purple triangle, orange background": "triangle",
}


def test_default_model_draws_the_shapes_it_is_asked_for(default_pipeline):
    """Shape class is the hard part (issue 8's target is 70 %): of 4 prompts x 3 seeds, at least 9
    of the 12 images must read as the shape asked for (10 did when this was written; chance is 3)."""
    from engine.pipeline import ImageRequest

    requests = [ImageRequest(prompt=p, width=256, height=256, seed=s) for s in (11, 12, 13) for p in SHAPES]
    images = default_pipeline.generate(requests)
    read = [(r.prompt, read_image(im).shape) for r, im in zip(requests, images, strict=True)]
    right = sum(SHAPES[prompt] == shape for prompt, shape in read)
    assert right >= 9, f"{right}/12 shapes right: {read}"
