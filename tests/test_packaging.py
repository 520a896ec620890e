"""A built wheel is a whole Kiln: the bundled model, the offline export data, and paths that work
outside the repository (read-only code, packages built under KILN_HOME)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of the tracked files: setuptools builds in the project's build/ folder, which
    # must not collect a stale copy of the code in the checkout.
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (t.decode() for t in tracked)):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(out)],
        check=True,
        cwd=out,
    )
    (made,) = out.glob("kiln-*.whl")
    return made


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel's files as pip would lay them out in site-packages."""
    site = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_the_wheel_carries_the_bundled_model_and_the_offline_export_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {str(p.relative_to(ROOT / "models")) for p in (ROOT / "models").rglob("*") if p.is_file()}
    assert {f"kiln/bundled/{name}" for name in bundled} <= names
    for folder in ("export/architectures", "export/assets"):
        files = {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file()}
        assert files and files <= names, folder
    assert "engine/worker/inference.proto" in names
    assert not any(n.startswith(("tests/", "build/", "models/")) or "__pycache__" in n for n in names)


def test_an_installed_kiln_finds_its_model_and_builds_outside_site_packages(installed, tmp_path):
    probe = (
        "import kiln.default_model as d, server.main as m; "
        "print(d.DEFAULT_MODEL); print(d.home()); print((d.DEFAULT_MODEL / 'model_index.json').is_file())"
    )
    env = {**os.environ, "PYTHONPATH": str(installed), "KILN_HOME": str(tmp_path / "home")}
    # From another folder, so the checkout is not importable by accident; PYTHONPATH comes before
    # the development install's own finder.
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    model, home, exists = out.stdout.split()
    assert Path(model) == installed / "kiln" / "bundled" / "kiln-shapes" and exists == "True"
    assert Path(home) == tmp_path / "home"
    env.pop("KILN_HOME")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.split()[1]) == tmp_path / "cache" / "kiln"


def test_an_installed_kiln_serves_the_bundled_model_from_anywhere(installed, tmp_path):
    """`kiln serve` with no arguments, run from the wheel's files in another folder: the bundled
    model, its package under KILN_HOME (seeded with an up-to-date export, which the start re-checks
    by file hashes instead of exporting again), hosted images under KILN_HOME too."""
    from export.package import build_package
    from kiln.default_model import DEFAULT_MODEL
    from tests.conftest import CACHE
    from tests._server import API_KEY, free_port, wait_ready

    home = tmp_path / "home"
    shutil.copytree(build_package(DEFAULT_MODEL, CACHE / "bundled", target="cpu"), home / "kiln-shapes" / "cpu")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(installed), "KILN_HOME": str(home), "KILN_API_KEYS": API_KEY, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--target", "cpu"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 180, proc, log)
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "a red circle"}], "size": "256x256", "steps": 2},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        image_url = r.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
        assert list((home / "images").glob("*.png")) and image_url.endswith(".png")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
