"""Captions for rendered scenes, and the held-out split of (shape, colour, background) triples.

About 15 % of the triples are held out: training never shows them, yet every pair inside them
(shape+colour, shape+background, colour+background) is seen in some other training triple, so an
unseen triple tests composition, not vocabulary. The split is a pure function of its seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .render import COLOUR_NAMES, SHAPES, Scene, random_scene

Triple = tuple[str, str, str]  # (shape, colour, background)

HELD_OUT_FRACTION = 0.15
SPLIT_SEED = 8

SMALL_WORDS = ("small", "little", "tiny")
BIG_WORDS = ("big", "large")

# {a} size+colour+shape phrase, {bg} background colour, {at} " at the top left" or "".
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {obj} on a {bg} background",
    "{bg} background, {obj}{at}",
    "a {obj}, {bg} background",
    "{obj} on {bg}{at}",
    "a {obj}{at} on a {bg} background",
    "a picture of a {obj} with a {bg} background",
    "{obj}{at}, {bg} background",
    "a {bg} background and a {obj}{at}",
)
# Phrasings only the evaluation uses, made of the training vocabulary.
EVAL_TEMPLATES: tuple[str, ...] = (
    "on a {bg} background, a {obj}{at}",
    "{bg} background with a {obj}",
)


def all_triples() -> list[Triple]:
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, COLOUR_NAMES, COLOUR_NAMES) if c != b]


def _pairs(t: Triple) -> tuple[tuple[str, str, str], ...]:
    s, c, b = t
    return (("sc", s, c), ("sb", s, b), ("cb", c, b))


@dataclass(frozen=True)
class Split:
    train: tuple[Triple, ...]
    held_out: tuple[Triple, ...]


def split_triples(seed: int = SPLIT_SEED, fraction: float = HELD_OUT_FRACTION) -> Split:
    """Hold out `fraction` of the triples, never the last training triple of any pair."""
    triples = all_triples()
    target = round(fraction * len(triples))
    counts: dict[tuple[str, str, str], int] = {}
    for t in triples:
        for p in _pairs(t):
            counts[p] = counts.get(p, 0) + 1
    order = np.random.default_rng(seed).permutation(len(triples))
    held: set[Triple] = set()
    for i in order:
        if len(held) == target:
            break
        t = triples[i]
        if all(counts[p] > 1 for p in _pairs(t)):
            held.add(t)
            for p in _pairs(t):
                counts[p] -= 1
    train = tuple(t for t in triples if t not in held)
    return Split(train=train, held_out=tuple(t for t in triples if t in held))


def caption(scene: Scene, rng: np.random.Generator, templates: tuple[str, ...] = TRAIN_TEMPLATES) -> str:
    """One of several phrasings of `scene`; size and position words appear only sometimes."""
    words = []
    size = scene.size_word
    if size is not None and rng.random() < 0.6:
        words.append(rng.choice(SMALL_WORDS if size == "small" else BIG_WORDS))
    words += [scene.colour, scene.shape]
    obj = " ".join(str(w) for w in words)
    at = ""
    if rng.random() < 0.5:
        pos = scene.position_words
        at = " in the center" if pos == "center" else f" at the {pos}"
    template = templates[rng.integers(len(templates))]
    if "{at}" not in template:
        at = ""
    text = template.format(obj=obj, bg=scene.background, at=at)
    return text.replace("a orange", "an orange")


def training_example(rng: np.random.Generator, split: Split, aspect: float = 1.0) -> Scene:
    """A random scene whose triple is in the training part of the split."""
    shape, colour, background = split.train[rng.integers(len(split.train))]
    return random_scene(rng, shape, colour, background, aspect=aspect)


def vocabulary() -> list[str]:
    """Every word any caption can contain (training and evaluation phrasings)."""
    words = set(SHAPES) | set(COLOUR_NAMES) | set(SMALL_WORDS) | set(BIG_WORDS)
    words |= {"top", "bottom", "left", "right", "center", "in", "at", "the", "an", ","}
    for t in TRAIN_TEMPLATES + EVAL_TEMPLATES:
        for w in t.replace(",", " , ").split():
            if "{" not in w:
                words.add(w)
    return sorted(words)
