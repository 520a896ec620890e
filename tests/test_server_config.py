"""The front end's configuration, its import boundary, and `kiln serve --model` (what `make serve` runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib

import httpx
import pytest

from server.config import ConfigError, load_config, parse_config
from tests._server import ROOT, free_port, wait_ready
from tests._workers import wait_for


@pytest.fixture()
def package(tiny_package):
    return str(tiny_package("sd1"))


def minimal(package: str, **sections) -> dict:
    return {"models": [{"name": "m", "package": package}], **sections}


def test_example_config_is_valid(package, tmp_path):
    raw = tomllib.loads((ROOT / "kiln.example.toml").read_text())
    raw["models"][0]["package"] = package  # the example names the default model's package
    config = parse_config(raw, env={})
    assert [m.aliases for m in config.models] == [["gpt-4o", "dall-e-3", "dall-e-2"]]
    assert config.images.ttl_minutes == 60 and config.images.response_format == "url"
    assert config.public_url == "http://127.0.0.1:8000"
    assert config.models[0].worker_model == "sd1"  # read from the package manifest


@pytest.mark.parametrize(
    "sections, setting",
    [
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"public_url": "kiln.example.com"}}, "server.public_url"),
        ({"server": {"prot": 1}}, "unknown field prot"),
        ({"images": {"response_format": "png"}}, "images.response_format"),
        ({"limits": {"max_n": 0}}, "limits.max_n"),
        ({"limits": {"max_steps": "ten"}}, "limits.max_steps"),
        ({"workers": {"local": 0}}, "workers"),
        ({"workers": {"remote": ["nohost"]}}, "workers.remote"),
        ({"auth": {"api_keys": ["short"]}}, "auth.api_keys[0]"),
        ({"server": {"max_header_bytes": 10}}, "server.max_header_bytes"),
        ({"workers": {"token": "too-short"}}, "workers.token"),
        ({"workers": {"tls_cert_file": "/etc/hostname"}}, "workers.tls_cert_file/tls_key_file"),
        ({"workers": {"tls_ca_file": "/no/such/ca.pem"}}, "workers.tls_ca_file"),
        ({"workers": {"models_refresh_s": 0}}, "workers.models_refresh_s"),
        ({"images": {"max_bytes": -1}}, "images.max_bytes"),
        ({"workers": {"session_cache": 0}}, "workers.session_cache"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(package, sections, setting):
    with pytest.raises(ConfigError, match=re.escape(setting)):
        parse_config(minimal(package, **sections), env={})


def test_the_worker_token_comes_from_the_environment_and_is_never_shown(package):
    token = "worker-secret-0123456789"
    config = parse_config(minimal(package, workers={"token": "from-the-file-0123456789"}), env={"KILN_WORKER_TOKEN": token})
    assert config.workers.token == token
    assert token not in repr(config) and "token=<set>" in repr(config.workers)
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(package, workers={"token": "short secret"}), env={})
    assert "short secret" not in str(err.value)


def test_model_names_must_be_unique_and_packages_real(package, tmp_path):
    with pytest.raises(ConfigError, match=r"models\[1\]\.aliases.*'gpt-4o'"):
        parse_config(
            {"models": [{"name": "a", "package": package, "aliases": ["gpt-4o"]}, {"name": "b", "package": package, "aliases": ["gpt-4o"]}]},
            env={},
        )
    with pytest.raises(ConfigError, match=r"models\[0\]\.package"):
        parse_config({"models": [{"name": "a", "package": str(tmp_path)}]}, env={})
    with pytest.raises(ConfigError, match="models"):
        parse_config({}, env={})


def test_api_keys_from_the_environment_replace_the_config_and_never_show(package, tmp_path):
    path = tmp_path / "kiln.toml"
    path.write_text(f'[auth]\napi_keys = ["from-config-key"]\n[[models]]\nname = "m"\npackage = "{package}"\n')
    assert load_config(path, env={}).auth.api_keys == ["from-config-key"]
    config = load_config(path, env={"KILN_API_KEYS": "env-key-00001, env-key-00002"})
    assert config.auth.api_keys == ["env-key-00001", "env-key-00002"]
    assert "env-key" not in repr(config) and "env-key" not in repr(config.auth)
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(package), env={"KILN_API_KEYS": "a secret"})
    assert "secret" not in str(e.value)


def test_server_imports_neither_onnxruntime_nor_torch():
    code = (
        "import sys, pkgutil, importlib, server\n"
        "for m in pkgutil.iter_modules(server.__path__): importlib.import_module('server.' + m.name)\n"
        "import engine.client.pool, engine.client.local\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('onnxruntime', 'torch', 'diffusers', 'transformers'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_kiln_serve_quick_start_prints_the_url_and_a_generated_key(package, tmp_path):
    """`kiln serve --port P --model DIR`, as `make serve` runs it, with no KILN_API_KEYS."""
    small = tmp_path / "sd1-small"
    shutil.copytree(package, small)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["sizes"]["default"] = "64x64"  # so the worker's warm-up at its default size stays tiny
    (small / "manifest.json").write_text(json.dumps(manifest))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEYS"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--model", str(small)],
            cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120, proc, log)
        assert wait_for(lambda: "API key" in log.read_text(), 30)  # the banner follows uvicorn's start
        text = log.read_text()
        assert f"Kiln is serving on {url}" in text
        key = re.search(r"API key \(generated; set KILN_API_KEYS to choose\): (\S+)", text).group(1)
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "a dot"}], "size": "64x64", "steps": 1},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert text.count(key) == 1  # printed once for the operator, never logged
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0


def test_kiln_serve_refuses_a_busy_port_and_exits_2(package):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "serve", "--port", str(port), "--model", package],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


def test_serve_picks_the_fastest_installed_target_unless_told(monkeypatch):
    import importlib.util

    from server.main import choose_target

    assert choose_target("cpu") == ("cpu", "asked for")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "openvino" else real(name, *a))
    target, why = choose_target("auto")
    assert target == "openvino" and "fastest" in why
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    target, why = choose_target("auto")
    assert target == "cpu" and "kiln[openvino]" in why
