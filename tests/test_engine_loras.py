"""Per-request LoRAs in the engine: the prompt syntax, validation, and variants served from one
base package (scale 0 is the base exactly, only the changed weights cost memory, batches per
variant give the same images as alone). Parity with diffusers: tests/test_lora_parity.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidRequestError, KilnError, UnknownLoraError
from engine.lora import LoraError, add_lora, take_lora_tags
from engine.request import MAX_LORAS, ImageRequest, LoraChoice, with_prompt_loras
from engine.sessions import RuntimeOptions

torch = pytest.importorskip("torch")

from tests.test_lora_files import TE_MODULES, _random_pairs, write_kohya  # noqa: E402

REQUEST = dict(prompt="a red cube", width=64, height=64, seed=7, steps=3, guidance_scale=5.0)


# ---- the prompt syntax ------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, clean, tags",
    [
        ("a cat", "a cat", []),
        ("a cat <lora:style:0.8>", "a cat", [("style", 0.8)]),
        ("<lora:style> a cat", "a cat", [("style", 1.0)]),
        ("a <LORA:ink:-0.5> cat, <lora:style:1.25>", "a cat,", [("ink", -0.5), ("style", 1.25)]),
        ("a cat < lora:x > <lora: spaced : 0.3 >", "a cat < lora:x >", [("spaced", 0.3)]),
    ],
)
def test_prompt_tags_are_taken_out(prompt, clean, tags):
    assert take_lora_tags(prompt) == (clean, tags)


@pytest.mark.parametrize(
    "prompt, says",
    [
        ("<lora::0.5>", "names no LoRA"),
        ("<lora:style:strong>", "'strong' is not a number"),
        ("<lora:style:0.5:1.0>", "one scale per LoRA"),
        ("<lora:<lora:a>b> a cat", "holds another tag"),  # taking <lora:a> out would leave <lora: b>
        ("a cat <lora:style", "is not closed"),
    ],
)
def test_bad_prompt_tags_are_refused_naming_the_tag(prompt, says):
    with pytest.raises(InvalidRequestError, match=says) as e:
        take_lora_tags(prompt)
    assert e.value.param == "prompt"


def test_scales_count_to_three_decimals(pipe):
    """0.8 and 0.80001 are one variant (one set of sessions); 0.0004 is the base."""
    variant = pipe.loras.variant
    assert variant([LoraChoice(name="style", scale=0.80001)], "unet") == variant([LoraChoice(name="style", scale=0.8)], "unet")
    assert variant([LoraChoice(name="style", scale=0.0004)], "unet") == ()


def test_tags_join_the_field_after_its_own():
    req = with_prompt_loras(ImageRequest(prompt="x <lora:b:0.5>", loras=(LoraChoice(name="a", scale=1.0),)))
    assert req.prompt == "x"
    assert req.loras == (LoraChoice(name="a", scale=1.0), LoraChoice(name="b", scale=0.5))
    assert with_prompt_loras(req) is req, "a prompt without tags is left as it is"


# ---- a package with LoRAs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_checkpoint):
    """Random LoRAs for the tiny SD 1.x model: `style` (UNet and text encoder), `unet_only`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    folder = tmp_path_factory.mktemp("loras")
    pairs = [(c, n, d * 4, u * 4, a) for c, n, d, u, a in _random_pairs(pipe, seed=11)]
    unet_pairs = [p for p in _random_pairs(pipe, seed=12) if p[0] == "unet"]
    unet_pairs = [(c, n, d * 4, u * 4, a) for c, n, d, u, a in unet_pairs]
    conv_pairs = [p for p in pairs if p[1] == "conv_in"]
    return {
        "style": write_kohya(pairs, folder / "style.safetensors", "sd1"),
        "unet_only": write_kohya(unet_pairs, folder / "unet_only.safetensors", "sd1"),
        "conv_only": write_kohya(conv_pairs, folder / "conv_only.safetensors", "sd1"),
    }


@pytest.fixture(scope="module")
def lora_package(tmp_path_factory, tiny_package, lora_files):
    package = tmp_path_factory.mktemp("pkg") / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    for name, path in lora_files.items():
        add_lora(package, path, name)
    return package


@pytest.fixture(scope="module")
def pipe(lora_package):
    from engine.pipeline import Pipeline

    return Pipeline(lora_package, RuntimeOptions(threads=1))


def one(pipe, **changes) -> np.ndarray:
    return pipe.generate([ImageRequest(**{**REQUEST, **changes})])[0]


def test_the_model_lists_its_loras(pipe):
    assert pipe.limits().loras == ("conv_only", "style", "unet_only")


def test_scale_zero_is_the_base_model_exactly(pipe):
    base = one(pipe)
    assert np.array_equal(one(pipe, loras=(LoraChoice(name="style", scale=0.0),)), base)
    assert np.array_equal(one(pipe, prompt=REQUEST["prompt"] + " <lora:style:0>"), base)


def test_a_lora_changes_the_image_and_the_tag_equals_the_field(pipe):
    base = one(pipe)
    styled = one(pipe, loras=(LoraChoice(name="style", scale=1.0),))
    assert np.abs(styled.astype(int) - base).mean() > 2, "the LoRA did not change the image"
    assert np.array_equal(one(pipe, prompt="<lora:style:1.0> " + REQUEST["prompt"]), styled)
    half = one(pipe, loras=(LoraChoice(name="style", scale=0.5),))
    assert not np.array_equal(half, styled) and not np.array_equal(half, base)


def test_mixed_variants_in_one_call_equal_each_alone(pipe):
    """Samples of different LoRAs never share a UNet call: a mixed batch gives each one's own image."""
    asks = [
        dict(),
        dict(loras=(LoraChoice(name="style", scale=1.0),)),
        dict(loras=(LoraChoice(name="unet_only", scale=0.7), LoraChoice(name="style", scale=0.4))),
        dict(seed=8, loras=(LoraChoice(name="style", scale=1.0),)),
    ]
    together = pipe.generate([ImageRequest(**{**REQUEST, **a}) for a in asks])
    for ask, image in zip(asks, together):
        assert np.array_equal(image, one(pipe, **ask))


def test_a_variant_costs_only_the_weights_it_changes(pipe, lora_package):
    """The variant's own tensors are exactly the initializers its LoRAs change, shared by its
    sessions of every size; a UNet-only LoRA builds no text-encoder session."""
    from engine.lora import load_lora

    matched = load_lora(lora_package, "unet_only")
    changed = {m.target.initializer for m in matched.pairs}
    index = pipe.unet.weights.arrays
    expected = sum(index[name].nbytes for name in changed)
    encoder_builds = pipe.text_encoders[0].stats().builds
    choice = (LoraChoice(name="unet_only", scale=0.9),)
    one(pipe, loras=choice)
    weights = pipe.unet.variant_weights((("unet_only", 0.9),))
    assert weights.nbytes == expected and set(weights.values) == changed
    one(pipe, loras=choice, width=96, height=64)  # another size, the same variant
    assert pipe.unet.variant_weights((("unet_only", 0.9),)) is weights, "the weights were computed again"
    assert pipe.text_encoders[0].stats().builds == encoder_builds


def test_a_convolution_lora_applies_at_every_optimisation_level(lora_package):
    """onnxruntime's "all" level ignores a Conv weight given with add_initializer (its NCHWc copy
    is made from the model's own): variant sessions are built at "extended" instead."""
    from engine.pipeline import Pipeline

    conv = (LoraChoice(name="conv_only", scale=1.0),)
    images = {}
    for level in ("extended", "all"):
        pipe = Pipeline(lora_package, RuntimeOptions(threads=1, optimization=level))
        images[level] = (one(pipe), one(pipe, loras=conv))
    for level, (base, styled) in images.items():
        assert np.abs(styled.astype(int) - base).mean() > 1, f"{level}: the conv_in LoRA changed nothing"
    assert np.abs(images["all"][1].astype(int) - images["extended"][1]).max() <= 2


def test_evicted_variants_free_their_weights(lora_package):
    from engine.pipeline import Pipeline

    pipe = Pipeline(lora_package, RuntimeOptions(threads=1, max_sessions=1))
    one(pipe, loras=(LoraChoice(name="style", scale=1.0),))
    assert pipe.unet.variant_bytes() > 0
    one(pipe)  # the base UNet session evicts the variant's (one slot)
    assert pipe.unet.variant_bytes() == 0
    assert pipe.unet.stats().evictions >= 1


def test_text_encoder_lora_changes_the_embeddings(pipe):
    base = pipe.encode_prompts(["a red cube"], [""])[0]["encoder_hidden_states"]
    styled = pipe.encode_prompts(["a red cube"], [""], [(LoraChoice(name="style", scale=1.0),)])[0]
    unet_only = pipe.encode_prompts(["a red cube"], [""], [(LoraChoice(name="unet_only", scale=1.0),)])[0]
    assert not np.allclose(styled["encoder_hidden_states"], base)
    assert np.array_equal(unet_only["encoder_hidden_states"], base)
    assert TE_MODULES  # the test LoRA adapts the text encoder's attention and MLP


@pytest.mark.parametrize(
    "loras, error, says",
    [
        ((LoraChoice(name="nope", scale=1.0),), UnknownLoraError, "no LoRA named 'nope' \\(its LoRAs: conv_only, style, unet_only\\)"),
        ((LoraChoice(name="style", scale=2.5),), InvalidRequestError, "between -2 and 2, got 2.5"),
        ((LoraChoice(name="style", scale=float("nan")),), InvalidRequestError, "must be a number"),
        ((LoraChoice(name="style"), LoraChoice(name="style", scale=0.5)), InvalidRequestError, "asked for twice"),
        (tuple(LoraChoice(name="style") for _ in range(MAX_LORAS + 1)), InvalidRequestError, f"at most {MAX_LORAS}"),
    ],
)
def test_bad_lora_choices_are_refused_before_any_work(pipe, loras, error, says):
    builds = pipe.unet.stats().builds
    with pytest.raises(error, match=says) as e:
        pipe.resolve(ImageRequest(**REQUEST, loras=loras))
    assert e.value.param == "loras"
    assert pipe.unet.stats().builds == builds


def test_an_unknown_tag_in_the_prompt_is_refused(pipe):
    with pytest.raises(UnknownLoraError, match="'ghost'"):
        pipe.resolve(ImageRequest(**{**REQUEST, "prompt": "a cat <lora:ghost:0.5>"}))


def test_a_lora_replaced_after_start_is_refused_not_half_applied(tmp_path, tiny_package, lora_files):
    """The worker listed what `unet_only` changes when it started; `kiln lora add --replace` of a
    file that also changes the text encoder must not be served with the old list."""
    from engine.pipeline import Pipeline

    package = tmp_path / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    add_lora(package, lora_files["unet_only"], "unet_only")
    pipe = Pipeline(package, RuntimeOptions(threads=1))
    add_lora(package, lora_files["style"], "unet_only", replace=True)
    with pytest.raises(KilnError, match="LoRA 'unet_only': .* changed since it was added"):
        one(pipe, loras=(LoraChoice(name="unet_only", scale=1.0),))


def test_a_lora_file_changed_on_disk_is_refused_at_first_use(tmp_path, tiny_package, lora_files):
    from engine.pipeline import Pipeline

    package = tmp_path / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    add_lora(package, lora_files["unet_only"], "unet_only")
    with open(package / "loras" / "unet_only.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    pipe = Pipeline(package, RuntimeOptions(threads=1))
    with pytest.raises(KilnError, match="changed since it was added; `kiln lora add` it again"):
        one(pipe, loras=(LoraChoice(name="unet_only", scale=1.0),))
    one(pipe)  # the base model still works


def test_a_runtime_without_loras_lists_none(tmp_path, tiny_package, tiny_target_package, lora_files, caplog):
    pytest.importorskip("openvino")
    from engine.pipeline import Pipeline

    package = tmp_path / "ov"
    shutil.copytree(tiny_target_package("sd1", "openvino"), package)
    with pytest.raises(LoraError, match="is a openvino package; LoRAs are served with cpu, cuda and tensorrt packages"):
        add_lora(package, lora_files["unet_only"], "unet_only")
    assert not (package / "loras.json").exists()
    # LoRAs copied over by hand are listed by the package but not served
    cpu = tmp_path / "cpu"
    shutil.copytree(tiny_package("sd1"), cpu)
    add_lora(cpu, lora_files["unet_only"], "unet_only")
    shutil.copytree(cpu / "loras", package / "loras")
    shutil.copy(cpu / "loras.json", package / "loras.json")
    pipe = Pipeline(package, RuntimeOptions(threads=1))
    assert pipe.limits().loras == ()
    assert "are not served: the openvino runtime does not apply LoRAs" in caplog.text
    with pytest.raises(UnknownLoraError, match="its LoRAs: none"):
        pipe.resolve(ImageRequest(**REQUEST, loras=(LoraChoice(name="unet_only"),)))


def test_the_package_without_loras_is_untouched(tiny_package):
    assert not (Path(tiny_package("sd1")) / "loras.json").exists()
