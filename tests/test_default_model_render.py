"""The default model's world: renderer, captions and held-out split, tokenizer, image reader."""

from __future__ import annotations

import numpy as np
import pytest

from export.default_model.captions import (
    EVAL_TEMPLATES,
    all_triples,
    caption,
    split_triples,
    training_example,
)
from export.default_model.evaluate_images import read_image, validate_on_renders
from export.default_model.render import COLOURS, Scene, random_scene, render
from export.default_model.tokenizer import MAX_LENGTH, load_tokenizer, save_tokenizer, token_ids


def test_render_is_deterministic_and_uses_reference_colours():
    scene = Scene("circle", "red", "blue", cx=0.5, cy=0.5, size=0.5)
    a, b = render(scene, 256, 256), render(scene, 256, 256)
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert tuple(a[128, 128]) == COLOURS["red"]
    assert tuple(a[2, 2]) == COLOURS["blue"]


@pytest.mark.parametrize("w,h", [(64, 64), (256, 128), (128, 256), (1792, 1024)])
def test_render_any_size_keeps_shape_inside(w, h):
    rng = np.random.default_rng(3)
    scene = random_scene(rng, aspect=w / h)
    img = render(scene, w, h)
    assert img.shape == (h, w, 3)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    assert (border == COLOURS[scene.background]).all()


def test_scene_rejects_same_shape_and_background_colour():
    with pytest.raises(ValueError, match="differ"):
        Scene("star", "red", "red", 0.5, 0.5, 0.4)


def test_split_is_deterministic_and_holds_out_about_15_percent():
    a, b = split_triples(), split_triples()
    assert a == b
    assert len(a.held_out) + len(a.train) == len(all_triples()) == 224
    assert 0.13 <= len(a.held_out) / 224 <= 0.17


def test_every_pair_of_a_held_out_triple_is_seen_in_training():
    split = split_triples()
    seen_sc = {(s, c) for s, c, _ in split.train}
    seen_sb = {(s, b) for s, _, b in split.train}
    seen_cb = {(c, b) for _, c, b in split.train}
    for s, c, b in split.held_out:
        assert (s, c) in seen_sc and (s, b) in seen_sb and (c, b) in seen_cb


def test_training_generator_never_draws_a_held_out_triple():
    split = split_triples()
    held = set(split.held_out)
    rng = np.random.default_rng(0)
    drawn = {(sc.shape, sc.colour, sc.background) for sc in (training_example(rng, split) for _ in range(5000))}
    assert not drawn & held
    assert len(drawn) == len(split.train)  # and every training triple does appear


def test_captions_name_shape_and_both_colours():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng)
        for templates in (None, EVAL_TEMPLATES):
            text = caption(scene, rng) if templates is None else caption(scene, rng, templates)
            words = text.replace(",", " ").split()
            assert scene.shape in words and scene.colour in words and scene.background in words


def test_reader_is_at_least_98_percent_right_on_400_renders():
    acc = validate_on_renders(400, seed=0)
    assert acc.shape >= 0.98 and acc.colour >= 0.98 and acc.background >= 0.98


def test_reader_survives_a_flat_image():
    r = read_image(np.full((64, 64, 3), 245, np.uint8))
    assert r.background == "white" and r.shape is None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle on a blue background",
        "A RED circle!!! on... a (blue) background?",
        "a zebra-striped dodecahedron",
        "a red 🙂 star 🚀 on green",
        "красный круг на синем фоне 赤い丸 دائرة",
        "",
        "   \t\n ",
        "red circle " * 200,
    ],
)
def test_tokenizer_never_crashes_and_always_gives_max_length_ids(tokenizer, prompt):
    ids = token_ids(tokenizer, [prompt])
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in ids[0].tolist()


def test_tokenizer_maps_unknown_words_to_unk_and_known_ones_to_themselves(tokenizer):
    ids = token_ids(tokenizer, ["Red zebra"])[0].tolist()
    assert ids[1] == tokenizer.convert_tokens_to_ids("red")
    assert ids[2] == tokenizer.unk_token_id


def test_tokenizer_truncates_over_long_prompts_keeping_eos(tokenizer):
    ids = token_ids(tokenizer, ["red circle " * 50])[0].tolist()
    assert len(ids) == MAX_LENGTH and ids[-1] == tokenizer.eos_token_id
