"""Shared fixtures: tiny random-weight checkpoints of each family, exported once per test run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny"
FAMILIES = ("sd1", "sd2v", "sdxl")
# Exports are reused across runs when the checkpoint hashes match, so a warm cache is fast.
CACHE = Path(os.environ.get("KILN_TEST_CACHE", ROOT / "build" / "test-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from export.random_checkpoint import build_random_checkpoint

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            out = CACHE / "checkpoints" / family
            if not (out / "model_index.json").exists():
                build_random_checkpoint(TINY / family, out, seed=0)
            made[family] = out
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_target_package(tiny_checkpoint):
    """get(family, target): the tiny checkpoint exported for `target` (cached under CACHE)."""
    from export.package import build_package

    made: dict[tuple[str, str], Path] = {}

    def get(family: str, target: str) -> Path:
        if (family, target) not in made:
            made[family, target] = build_package(tiny_checkpoint(family), CACHE / "packages", target=target, name=family)
        return made[family, target]

    return get


@pytest.fixture(scope="session")
def tiny_package(tiny_target_package):
    return lambda family: tiny_target_package(family, "cpu")


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)
