"""A throwaway certificate authority for the TLS tests: a CA, a worker certificate for 127.0.0.1
and localhost, one for the DNS name `kiln-worker.test` only (a worker found by DNS and dialled by
address), and a client certificate, made with the `openssl` command (P-256 keys, valid a day).

`make_ca(folder)` returns the PEM paths, or None when `openssl` is not installed (tests skip,
saying so).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's certificate (what clients and workers trust)
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    named_cert: Path  # names only NAMED_HOST, not the address it is dialled on
    named_key: Path


NAMED_HOST = "kiln-worker.test"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr}")


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


def make_ca(folder: Path) -> Certificates | None:
    if shutil.which("openssl") is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=kiln test CA", cwd=folder)
    _issue(folder, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _issue(folder, "client", "/CN=kiln front end", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "named", f"/CN={NAMED_HOST}", f"subjectAltName=DNS:{NAMED_HOST}\nextendedKeyUsage=serverAuth\n")
    return Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        named_cert=folder / "named.pem",
        named_key=folder / "named.key",
    )
