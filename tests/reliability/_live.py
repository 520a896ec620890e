"""`kiln serve` for the fault suite: tests._server.serve_process with room for concurrent load.

The shared test server keeps one sample per UNet call and two queued images, so that a full queue
is easy to reach on purpose; under the concurrent load here that would make most answers 429s.
These servers batch four samples and queue 32 images, and can take extra environment (the
fault-injection prompt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import _server
from tests._server import LiveServer

WORKERS = {"max_batch": 4, "max_queue": 32}


def serve(package: Path, base: Path, env: dict[str, str] | None = None, workers: dict | None = None, **limits) -> LiveServer:
    """serve_process(package, base, **limits) with these [workers] settings and environment."""
    settings = {**WORKERS, **(workers or {})}
    plain = _server.toml_config

    def toml_config(*args, **kwargs) -> str:
        text = plain(*args, **kwargs)
        for key, value in settings.items():
            text, found = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
            assert found == 1, f"tests/_server.py's config has no single `{key} =` line any more"
        return text

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_server, "toml_config", toml_config)
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        return _server.serve_process(package, base, **limits)


def chat(prompt: str = "a red circle", **fields) -> dict:
    return {"model": _server.MODEL, "messages": [{"role": "user", "content": prompt}], **fields}
