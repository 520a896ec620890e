"""`kiln serve`: start local engine workers and the HTTP front end.

    kiln serve --config kiln.toml                       # a deployment (see kiln.example.toml)
    kiln serve --port 8000 --model models/kiln-shapes   # quick start (what `make serve` runs)

Quick start builds the model's package if it is missing (in a child process: torch never enters
this one), starts one local worker, and serves the model under its own name and the aliases
gpt-4o, dall-e-3 and dall-e-2. API keys come from the config or `KILN_API_KEYS`
(comma-separated); when there are none, one is generated and printed (never logged).
Local workers always require a worker token: workers.token (or KILN_WORKER_TOKEN), else a random
one made at each start; it reaches them in their environment, never on a command line.
Exit status: 0 after a clean stop, 2 for a bad setting or a failed start.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import msgspec

from engine.client.credentials import Endpoint, tls_channel_credentials
from engine.client.discovery import DnsDiscovery, is_dns_target
from engine.errors import KilnError
from kiln.default_model import DEFAULT_MODEL, home
from server.config import AuthConfig, Config, ConfigError, load_config, parse_config

log = logging.getLogger("kiln.serve")

DEFAULT_ALIASES = ["gpt-4o", "dall-e-3", "dall-e-2"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln serve", description="Serve the OpenAI-compatible image API.")
    p.add_argument("--config", default=None, help="kiln.toml (see kiln.example.toml)")
    p.add_argument("--model", default=None, help="quick start: a checkpoint or package folder (default models/kiln-shapes)")
    p.add_argument(
        "--target",
        default="auto",
        help="quick start from a checkpoint: the package target (auto: the fastest this machine has; cpu; openvino)",
    )
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1, or the config's)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 8000, or the config's)")
    p.add_argument("--public-url", default=None, help="base URL of hosted images, for a reverse proxy")
    return p


def quick_config(model: Path, env: dict[str, str], target: str = "cpu") -> dict:
    """The config of `kiln serve --model DIR`: one local worker, the default aliases."""
    package = package_for(model, target)
    from engine.manifest import read_manifest

    name = read_manifest(package).name
    return {
        "models": [{"name": name, "package": str(package), "aliases": [a for a in DEFAULT_ALIASES if a != name]}],
        "workers": {"local": 1},
        "images": {"dir": str(home() / "images")},
    }


def choose_target(wanted: str) -> tuple[str, str]:
    """(target, why) for `--target`; "auto" picks the fastest CPU runtime installed."""
    if wanted != "auto":
        return wanted, "asked for"
    if importlib.util.find_spec("openvino") is not None:
        # Measured on the bundled model, 256x256, 20 steps: 0.23 s an image against 0.36 s for the
        # cpu target; 6.6 against 2.5 images/s at concurrency 8 (README, TARGET=openvino).
        return "openvino", "auto: OpenVINO is installed, the fastest CPU runtime (bf16 where the CPU has it)"
    return "cpu", "auto: onnxruntime's CPU provider (pip install 'kiln[openvino]' for the faster openvino target)"


def package_for(model: Path, target: str = "cpu") -> Path:
    """`model` itself if it is a package, else its `target` package under build/, exported if missing
    or stale (the export reuses the package when the checkpoint's file hashes are unchanged)."""
    if (model / "manifest.json").is_file():
        return model
    if not model.is_dir():
        raise ConfigError(f"--model {model} does not exist (give a diffusers checkpoint or a package folder)")
    package = home() / model.name / target
    have = (package / "manifest.json").is_file()
    log.info("checking the package for %s%s", model, "" if have else " (first start: exporting, this takes a while)")
    cmd = [sys.executable, "-m", "kiln.cli", "export", str(model), "--target", target, "--out", str(home())]
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
        if not have:
            raise ConfigError(
                f"could not build a package from {model} (see the export error above). A checkpoint is exported "
                "once, which needs the export extras (pip install 'kiln[cpu,export]'); or give --model a package "
                "folder exported elsewhere"
            )
        log.warning("could not re-check %s against %s (is `.[export]` installed?); serving the existing package", package, model)
    return package


def resolve_config(args: argparse.Namespace, env: dict[str, str]) -> tuple[Config, bool]:
    """The process's Config; True when the API key was generated here."""
    if args.config and args.model:
        raise ConfigError("give either --config or --model, not both (models are listed in the config)")
    if args.config:
        config = load_config(args.config, env=env)
    else:
        model = Path(args.model or DEFAULT_MODEL)
        target, why = choose_target(args.target)
        if not (model / "manifest.json").is_file():  # a package brings its own target
            print(f"kiln serve: target {target} ({why})", file=sys.stderr, flush=True)
        config = parse_config(quick_config(model, env, target), source="--model", env=env)
    server = config.server
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("public_url", args.public_url)) if v is not None}
    if overrides:
        config = parse_config(msgspec.to_builtins(msgspec.structs.replace(config, server=msgspec.structs.replace(server, **overrides))), source="command line", env={})
    generated = False
    if not config.auth.api_keys:
        config = msgspec.structs.replace(config, auth=AuthConfig(api_keys=["kiln-" + secrets.token_urlsafe(24)]))
        generated = True
    return config, generated


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another with --port") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, generated = resolve_config(args, dict(os.environ))
        logging.getLogger("kiln").setLevel(config.server.log_level.upper())
        check_port_free(config.server.host, config.server.port)
        return serve(config, generated)
    except KilnError as e:
        print(f"kiln serve: {e}", file=sys.stderr)
        return 2


def serve(config: Config, generated_key: bool) -> int:
    import uvicorn

    from engine.client.local import LocalWorkers
    from engine.client.pool import WorkerPool
    from server.app import create_app
    from server.http_limits import uvicorn_options
    from server.metrics import Metrics

    w = config.workers
    if w.local and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(
            "local workers run packages with onnxruntime, which is not installed: "
            "pip install 'kiln[cpu]' (or 'kiln[gpu]' on a CUDA machine)"
        )
    metrics = Metrics()
    local = None
    endpoints, discovery = remote_endpoints(config)
    # Local workers are always authenticated: another user of this machine could otherwise reach
    # their loopback port. Without a configured token, a fresh one each start (only we know it).
    local_token = w.token or secrets.token_urlsafe(32)
    # uvicorn stops on SIGINT/SIGTERM and then re-raises the signal; ours turns it into a clean
    # return, so the workers are stopped and the exit status is 0.
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if w.local:
        packages = [m.package for m in config.models if m.package]
        local = LocalWorkers(
            packages,
            count=w.local,
            ports=[w.base_port + k for k in range(w.local)] if w.base_port else None,
            max_batch=w.max_batch,
            max_queue=w.max_queue,
            warmup_sizes=w.warmup_sizes,
            batching=w.batching,
            threads=w.threads,
            session_cache=w.session_cache,
            devices=w.devices or None,
            # A worker signalled with the front end (a process group, a container) keeps serving
            # what it accepted for longer than the front end drains.
            drain_timeout=config.limits.drain_timeout + 10.0,
            on_restart=lambda address: metrics.worker_restarts.inc(worker=address),
            token=local_token,
        )
        log.info("starting %d local worker(s) for %s", w.local, ", ".join(packages))
        endpoints += [Endpoint(a, token=local_token) for a in local.start(timeout=w.start_timeout_s)]  # loopback: plaintext
    try:
        app = create_app(config, WorkerPool(endpoints, discovery=discovery), close_engine=True, metrics=metrics)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.server.host,
                port=config.server.port,
                log_config=None,
                access_log=False,
                # Our drain (server/shutdown.py) has already answered everything when uvicorn stops.
                timeout_graceful_shutdown=5,
                **uvicorn_options(config.server.max_header_bytes),  # oversized heads: 431 error objects
            )
        )
        banner = _banner(config, generated_key)
        try:
            asyncio.run(_run(server, banner, app.drain))
        except _Stopped:
            pass
        return 0 if server.started else 2
    except _Stopped:
        log.info("stopped before the server started")
        return 0
    finally:
        if local is not None:
            local.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def remote_endpoints(config: Config) -> tuple[list[Endpoint], DnsDiscovery | None]:
    """workers.remote with the configured token (empty: none) and TLS (no CA file: plaintext): the
    host:port entries as endpoints, the dns:///name:port entries as one discovery (None: none)."""
    w = config.workers
    credentials = None
    if w.tls_ca_file:
        try:
            credentials = tls_channel_credentials(w.tls_ca_file, w.tls_cert_file or None, w.tls_key_file or None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    token = w.token or None
    names = [a for a in w.remote if is_dns_target(a)]
    try:
        discovery = DnsDiscovery(names, token=token, credentials=credentials) if names else None
    except ValueError as e:
        raise ConfigError(f"workers.remote: {e}") from None
    return [Endpoint(a, token=token, credentials=credentials) for a in w.remote if not is_dns_target(a)], discovery


class _Stopped(Exception):
    """SIGINT or SIGTERM."""


def _stop(signum, frame) -> None:
    raise _Stopped(signum)


async def _run(server, banner: str, drain) -> None:
    """Serve until SIGTERM/SIGINT, then drain (server/shutdown.py) before uvicorn stops."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(banner, flush=True)
        # Replaces uvicorn's handlers, which would close the listener and cut requests after its
        # graceful timeout; a second signal while draining changes nothing.
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        signalled = asyncio.create_task(stopping.wait())
        await asyncio.wait({task, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.is_set() and not task.done():
            await drain.run()
            server.should_exit = True
        signalled.cancel()
    await task


def _banner(config: Config, generated_key: bool) -> str:
    url = f"http://{config.server.host}:{config.server.port}"
    names = ", ".join(n for m in config.models for n in (m.name, *m.aliases))
    lines = [
        "",
        f"Kiln is serving on {url}  (models: {names})",
        f"  Playground: {url}/  (open it in a browser)",
        f"  OpenAPI: {url}/schema   metrics: {url}/metrics",
    ]
    if generated_key:  # printed for the operator, never logged
        lines.append(f"  API key (generated; set KILN_API_KEYS to choose): {config.auth.api_keys[0]}")
    else:
        lines.append(f"  API keys: {len(config.auth.api_keys)} from the config or KILN_API_KEYS")
    lines.append(
        f'  try: curl {url}/v1/chat/completions -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" '
        f"-d '{{\"model\": \"gpt-4o\", \"messages\": [{{\"role\": \"user\", \"content\": \"a red circle\"}}], \"size\": \"256x256\"}}'"
    )
    return "\n".join(lines) + "\n"
