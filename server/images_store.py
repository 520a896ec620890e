"""Hosted images: generated PNGs on disk under unguessable ids, served at a stable path, with
expiry and a byte cap.

An id is 192 random bits (`secrets.token_urlsafe(24)`, 32 characters), so a URL is its own
capability: the image route needs no API key, like OpenAI's signed image URLs. A file expires
`ttl` seconds after it was written (its mtime); expired files are refused at once and removed by
`clean()`, which the app runs every `images.cleanup_interval_s`.

The folder may hold at most `max_bytes` of images (0: no cap): past it, `save` removes the oldest
first. The bytes in use are a running total kept in memory -- counted once by scanning the folder
at start, then updated by `save`, `clean` and the evictions -- so a save never lists the folder.
`clean` scans anyway (it must read mtimes), and rebuilds the total from what it finds, which
corrects any drift (files removed by hand, say).

A file is served from a descriptor opened before anything is sent (`open`): once open, the
cleaner or an eviction removing the file cannot cut the answer short (POSIX keeps an unlinked
file's data until its last descriptor closes), and a file gone before the open is a plain 404.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from server.errors import ImageNotFoundError
from server.metrics import Metrics

log = logging.getLogger("kiln.server.images")

ROUTE = "/v1/images/files"
ID_BYTES = 24  # 192 bits; the issue asks for at least 128
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{32}\.png$")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(frozen=True)
class OpenImage:
    """A hosted image opened for reading: the caller owns `fd` and closes it."""

    fd: int
    size: int  # bytes
    mtime: float  # seconds since the epoch
    seconds_left: int  # until it expires


@dataclass(frozen=True)
class HostedImage:
    data: bytes  # the PNG
    mtime: float
    seconds_left: int


class ImageStore:
    def __init__(
        self, folder: Path | str, ttl_s: float, public_url: str, max_bytes: int = 0, metrics: Metrics | None = None
    ):
        self.folder = Path(folder)
        self.ttl_s = ttl_s
        self.public_url = public_url.rstrip("/")
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.folder.mkdir(parents=True, exist_ok=True)
        # id -> (bytes, save sequence number), oldest first. Saves run in worker threads, so the
        # index, the total and the store's metrics change only under the lock.
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._bytes = 0
        self._seq = 0
        self._rebuild(self._scan(), since_seq=0)

    # ---- writing ---------------------------------------------------------------------------

    def save(self, png: bytes) -> str:
        """Write one PNG; returns its id (see `save_all`)."""
        return self.save_all([png])[0]

    def save_all(self, pngs: list[bytes]) -> list[str]:
        """Write the PNGs of one answer; their ids. Removes the oldest images if the folder is then
        over `max_bytes`, never one of these: an answer's URLs all work when it is sent. Blocking
        file I/O: call it from a worker thread."""
        ids = []
        for png in pngs:
            image_id = secrets.token_urlsafe(ID_BYTES)
            tmp = self.folder / f".{image_id}.tmp"
            tmp.write_bytes(png)
            os.replace(tmp, self.folder / f"{image_id}.png")  # readers never see a partial file
            with self._lock:
                self._seq += 1
                self._index[image_id] = (len(png), self._seq)
                self._bytes += len(png)
            ids.append(image_id)
        with self._lock:
            self._evict_over_cap(keep=set(ids))
            self._publish()
        return ids

    def _evict_over_cap(self, keep: set[str]) -> None:
        """Remove the oldest images, except `keep`, until the total is within the cap. Holds the lock."""
        if not self.max_bytes:
            return
        evicted = 0
        while self._bytes > self.max_bytes and len(self._index) > len(keep):
            image_id = next(i for i in self._index if i not in keep)  # the oldest not kept
            size, _ = self._index.pop(image_id)
            self._bytes -= size
            try:
                (self.folder / f"{image_id}.png").unlink()
            except FileNotFoundError:  # the cleaner or a person got there first
                pass
            evicted += 1
        if evicted:
            if self.metrics is not None:
                self.metrics.images_evicted.inc(evicted)
            log.info("images.max_bytes (%d) reached: removed the %d oldest images", self.max_bytes, evicted)

    def clean(self) -> int:
        """Remove expired images (and stale temporary files); returns how many were removed.
        Also recounts the bytes in use from the folder."""
        with self._lock:
            since_seq = self._seq
        now, removed = time.time(), 0
        kept = []
        for mtime, image_id, size in self._scan():
            if now - mtime <= self.ttl_s:
                kept.append((mtime, image_id, size))
                continue
            try:
                (self.folder / f"{image_id}.png").unlink()
                removed += 1
            except FileNotFoundError:
                pass
        for tmp in self.folder.glob(".*.tmp"):  # a save that died between write and rename
            try:
                if now - tmp.stat().st_mtime > self.ttl_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        # An eviction between the scan and here may have removed a file listed in `kept`: it is
        # then counted until the next clean (or dropped at no cost by the next eviction).
        self._rebuild(kept, since_seq)
        if removed:
            log.info("removed %d expired images from %s", removed, self.folder)
        return removed

    def _scan(self) -> list[tuple[float, str, int]]:
        """(mtime, id, bytes) of every hosted image file, oldest first. Symlinks and other
        non-regular files are skipped: they are never served, so they are not counted."""
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not _NAME_RE.match(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found.append((info.st_mtime, entry.name[:-4], info.st_size))
        found.sort()
        return found

    def _rebuild(self, files: list[tuple[float, str, int]], since_seq: int) -> None:
        """Replace the index with `files` (oldest first), keeping images saved since `since_seq`
        (a save that ran while the folder was being scanned)."""
        with self._lock:
            index: OrderedDict[str, tuple[int, int]] = OrderedDict((i, (size, 0)) for _, i, size in files)
            for image_id, (size, seq) in self._index.items():
                if seq > since_seq:
                    index.pop(image_id, None)
                    index[image_id] = (size, seq)
            self._index = index
            self._bytes = sum(size for size, _ in index.values())
            self._evict_over_cap(keep=set(list(index)[-1:]))  # the newest stays, as after a save
            self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.stored_images.set(len(self._index))
            self.metrics.stored_bytes.set(self._bytes)

    # ---- reading ---------------------------------------------------------------------------

    def url(self, image_id: str) -> str:
        return f"{self.public_url}{ROUTE}/{image_id}.png"

    def _file(self, name: str) -> tuple[str, Path]:
        image_id = name[:-4] if name.endswith(".png") else name
        if not _ID_RE.match(image_id):
            raise ImageNotFoundError(f"no image {name!r}: image ids are 32 URL-safe characters", param="image_id")
        return image_id, self.folder / f"{image_id}.png"

    def _gone(self, image_id: str) -> ImageNotFoundError:
        return ImageNotFoundError(f"image {image_id} does not exist or has expired", param="image_id")

    def _check_age(self, image_id: str, mtime: float) -> int:
        left = self.ttl_s - (time.time() - mtime)
        if left < 0:
            raise ImageNotFoundError(
                f"image {image_id} has expired (images are kept {self.ttl_s / 60:g} minutes)", param="image_id"
            )
        return int(left)

    def open(self, name: str) -> OpenImage:
        """Open `<id>.png` for reading, or ImageNotFoundError if it is unknown, expired or not a
        regular file. What is checked is the opened file itself (fstat), so nothing can change
        between the check and the read. Blocking: call it from a worker thread."""
        image_id, path = self._file(name)
        try:
            # O_NOFOLLOW: a symlink planted under an id's name is never followed; O_NONBLOCK: a
            # FIFO planted there does not hang the open (and is refused below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise self._gone(image_id) from None
        except OSError as e:  # ELOOP: a symlink; anything else: not a file we serve
            log.info("image %s not served: %s", image_id, e.strerror)
            raise self._gone(image_id) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self._gone(image_id)
            left = self._check_age(image_id, info.st_mtime)
        except BaseException:
            os.close(fd)
            raise
        return OpenImage(fd=fd, size=info.st_size, mtime=info.st_mtime, seconds_left=left)

    def read(self, name: str) -> HostedImage:
        """`<id>.png` read in full through `open` (ImageNotFoundError as there). Blocking."""
        image = self.open(name)
        with os.fdopen(image.fd, "rb") as f:
            data = f.read()
        return HostedImage(data=data, mtime=image.mtime, seconds_left=image.seconds_left)

    def path(self, name: str) -> Path:
        """The file for `<id>.png`, or ImageNotFoundError if it is unknown or expired. The file
        may still vanish after this returns: readers use `open` or `read`."""
        image_id, path = self._file(name)
        try:
            info = path.lstat()  # lstat: a symlink planted under an id's name is never followed
        except FileNotFoundError:
            raise self._gone(image_id) from None
        if not stat.S_ISREG(info.st_mode):
            raise self._gone(image_id)
        self._check_age(image_id, info.st_mtime)
        return path

    def count(self) -> int:
        """Images hosted (the in-memory count, exact as of the last save, eviction or clean)."""
        with self._lock:
            return len(self._index)

    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes
