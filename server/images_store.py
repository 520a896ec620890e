"""Hosted images: generated PNGs on disk under unguessable ids, served at a stable path, with expiry.

An id is 192 random bits (`secrets.token_urlsafe(24)`, 32 characters), so a URL is its own
capability: the image route needs no API key, like OpenAI's signed image URLs. A file expires
`ttl` seconds after it was written (its mtime); expired files are refused at once and removed by
`clean()`, which the app runs every `images.cleanup_interval_s`.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path

from server.errors import ImageNotFoundError

log = logging.getLogger("kiln.server.images")

ROUTE = "/v1/images/files"
ID_BYTES = 24  # 192 bits; the issue asks for at least 128
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class ImageStore:
    def __init__(self, folder: Path | str, ttl_s: float, public_url: str):
        self.folder = Path(folder)
        self.ttl_s = ttl_s
        self.public_url = public_url.rstrip("/")
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, png: bytes) -> str:
        """Write one PNG; returns its id. Blocking file I/O: call it from a worker thread."""
        image_id = secrets.token_urlsafe(ID_BYTES)
        tmp = self.folder / f".{image_id}.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, self.folder / f"{image_id}.png")  # readers never see a partial file
        return image_id

    def url(self, image_id: str) -> str:
        return f"{self.public_url}{ROUTE}/{image_id}.png"

    def path(self, name: str) -> Path:
        """The file for `<id>.png`, or ImageNotFoundError if it is unknown or expired."""
        image_id = name[:-4] if name.endswith(".png") else name
        if not _ID_RE.match(image_id):
            raise ImageNotFoundError(f"no image {name!r}: image ids are 32 URL-safe characters", param="image_id")
        path = self.folder / f"{image_id}.png"
        try:
            info = path.lstat()  # lstat: a symlink planted under an id's name is never followed
        except FileNotFoundError:
            raise ImageNotFoundError(f"image {image_id} does not exist or has expired", param="image_id") from None
        if not stat.S_ISREG(info.st_mode):
            raise ImageNotFoundError(f"image {image_id} does not exist or has expired", param="image_id")
        age = time.time() - info.st_mtime
        if age > self.ttl_s:
            raise ImageNotFoundError(f"image {image_id} has expired (images are kept {self.ttl_s / 60:g} minutes)", param="image_id")
        return path

    def seconds_left(self, path: Path) -> int:
        try:
            return max(0, int(self.ttl_s - (time.time() - path.stat().st_mtime)))
        except FileNotFoundError:
            return 0

    def clean(self) -> int:
        """Remove expired images (and stale temporary files); returns how many were removed."""
        now, removed = time.time(), 0
        for path in self.folder.iterdir():
            if not (path.suffix == ".png" or path.name.endswith(".tmp")):
                continue
            try:
                if now - path.stat().st_mtime > self.ttl_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("removed %d expired images from %s", removed, self.folder)
        return removed

    def count(self) -> int:
        return sum(1 for p in self.folder.glob("*.png"))
