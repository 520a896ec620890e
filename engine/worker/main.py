"""`kiln worker`: one engine worker process (one per GPU), serving model packages over gRPC.

    kiln worker --package build/<name>/<target> [--package ...] --listen 127.0.0.1:50051
                [--max-batch 8] [--max-queue 64] [--warmup-size 256x256[,512x512]] [--no-batching]
                [--threads 0] [--drain-timeout 30] [--session-cache 4] [--ready-file PATH]
                [--token-file PATH] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]

The worker token comes from KILN_WORKER_TOKEN or --token-file, never from an option's value (the
command line is visible in `ps`). A worker listening beyond loopback must have one.

Exit status: 0 after a clean stop (SIGTERM/SIGINT drains first), 2 for a bad setting or a
start-up failure (the message names the setting).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Mapping

from engine.errors import InvalidRequestError
from engine.shapes import parse_size
from engine.worker.auth import TOKEN_ENV, ServerTLS, is_loopback, read_pem, token_problem
from engine.worker.server import WorkerConfig, run_worker

log = logging.getLogger("kiln.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln worker", description="Serve model packages over gRPC (KServe v2 protocol).")
    p.add_argument("--package", action="append", required=True, help="model package folder (repeat for several)")
    p.add_argument("--listen", default="127.0.0.1:50051", help="host:port (port 0: any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="samples per UNet call (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="images waiting for admission before refusing (default 64)")
    p.add_argument(
        "--warmup-size",
        default="",
        help="WxH[,WxH...]: sizes warmed up at --max-batch before ready (default: each package's default size)",
    )
    p.add_argument("--no-batching", action="store_true", help="one request at a time (for comparison)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads per session (0: one per core)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish accepted work on SIGTERM")
    p.add_argument(
        "--session-cache",
        type=int,
        default=None,
        help="fixed-shape sessions kept per component besides the warm-up sizes (default 4, or KILN_MAX_SESSIONS)",
    )
    p.add_argument("--ready-file", default=None, help="write host:port here once ready")
    p.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the token every RPC must carry (or set {TOKEN_ENV}; required beyond loopback)",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mutual TLS)")
    return p


def _token(parser: argparse.ArgumentParser, token_file: str | None, env: Mapping[str, str]) -> str | None:
    from_env = env.get(TOKEN_ENV, "").strip()
    if token_file and from_env:
        parser.error(f"give the worker token once: --token-file or {TOKEN_ENV}, not both")
    if token_file:
        try:
            token, setting = Path(token_file).read_text().strip(), f"--token-file {token_file}"
        except OSError as e:
            parser.error(f"--token-file {token_file}: cannot read it ({e.strerror})")
    else:
        token, setting = from_env, TOKEN_ENV
    if not token:
        return None
    problem = token_problem(token)
    if problem:
        parser.error(f"the worker token ({setting}) {problem}")  # never echoed
    return token


def _tls(parser: argparse.ArgumentParser, a: argparse.Namespace) -> ServerTLS | None:
    if bool(a.tls_cert) != bool(a.tls_key):
        parser.error("--tls-cert and --tls-key come as a pair (the worker's certificate and its key)")
    if a.tls_client_ca and not a.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    if not a.tls_cert:
        return None
    try:
        return ServerTLS(
            cert_chain=read_pem(a.tls_cert, "--tls-cert"),
            private_key=read_pem(a.tls_key, "--tls-key"),
            client_ca=read_pem(a.tls_client_ca, "--tls-client-ca") if a.tls_client_ca else None,
        )
    except ValueError as e:
        parser.error(str(e))


def parse_config(argv: list[str], env: Mapping[str, str] | None = None) -> WorkerConfig:
    """argv (and the environment, for the token) -> a checked WorkerConfig; exits 2 with a
    message naming the bad setting."""
    env = os.environ if env is None else env
    parser = build_parser()
    a = parser.parse_args(argv)
    packages = tuple(Path(p) for p in a.package)
    for path in packages:
        if not (path / "manifest.json").is_file():
            parser.error(f"--package {path} is not a model package (no manifest.json); build one with `kiln export`")
    host, sep, port = a.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 <= int(port) < 65536):
        parser.error(f"--listen must be host:port (for example 127.0.0.1:50051), got {a.listen!r}")
    if a.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {a.max_batch}")
    if a.max_queue < 1:
        parser.error(f"--max-queue must be at least 1, got {a.max_queue}")
    if a.threads < 0:
        parser.error(f"--threads must be 0 (onnxruntime's default) or more, got {a.threads}")
    if a.drain_timeout <= 0:
        parser.error(f"--drain-timeout must be a positive number of seconds, got {a.drain_timeout}")
    if a.session_cache is not None and a.session_cache < 1:
        parser.error(f"--session-cache must be at least 1, got {a.session_cache}")
    sizes = []
    for text in filter(None, (s.strip() for s in a.warmup_size.split(","))):
        try:
            sizes.append(parse_size(text, param="--warmup-size"))
        except InvalidRequestError as e:
            parser.error(f"--warmup-size: {e}")
    token = _token(parser, a.token_file, env)
    if token is None and not is_loopback(host):
        # Anyone who can reach the port could otherwise run the models (and read what they make).
        parser.error(
            f"--listen {a.listen} is reachable from other machines: set {TOKEN_ENV} (or --token-file) "
            "to a shared secret of at least 16 characters, and the same token as the front end's workers.token"
        )
    tls = _tls(parser, a)
    return WorkerConfig(
        packages=packages,
        listen=a.listen,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        batching=not a.no_batching,
        warmup_sizes=tuple(sizes),
        threads=a.threads,
        drain_timeout=a.drain_timeout,
        session_cache=a.session_cache,
        ready_file=Path(a.ready_file) if a.ready_file else None,
        token=token,
        tls=tls,
    )


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(list(argv or []))
    except SystemExit as e:  # argparse's message is already printed
        return int(e.code or 0)
    return asyncio.run(run_worker(config))


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
