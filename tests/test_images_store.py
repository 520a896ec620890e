"""The hosted-image store: a byte cap with oldest-first eviction, a running total kept without
listing the folder on each save, metrics, and files served from a descriptor opened first, so a
file removed meanwhile is served whole or answered 404 -- never a 500 or an ERROR log."""

from __future__ import annotations

import logging
import os
import time

import httpx
import pytest

from server.images_store import ImageStore
from server.metrics import Metrics
from tests._server import free_port, thread_server

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 92  # 100 bytes; the store never decodes what it hosts


def store_with(tmp_path, max_bytes: int = 0, ttl_s: float = 60) -> tuple[ImageStore, Metrics]:
    metrics = Metrics()
    return ImageStore(tmp_path, ttl_s=ttl_s, public_url="http://h", max_bytes=max_bytes, metrics=metrics), metrics


def exists(store: ImageStore, image_id: str) -> bool:
    return (store.folder / f"{image_id}.png").exists()


def test_saving_past_the_cap_removes_the_oldest_images_first(tmp_path):
    store, metrics = store_with(tmp_path, max_bytes=350)
    ids = [store.save(PNG) for _ in range(5)]
    assert [exists(store, i) for i in ids] == [False, False, True, True, True]
    assert store.bytes_used() == 300 and store.count() == 3
    assert metrics.images_evicted.values[()] == 2
    assert metrics.stored_bytes.values[()] == 300 and metrics.stored_images.values[()] == 3


def test_an_image_larger_than_the_cap_is_still_kept_alone(tmp_path):
    store, _ = store_with(tmp_path, max_bytes=150)
    first = store.save(PNG)
    big = store.save(PNG * 3)
    assert not exists(store, first) and exists(store, big)  # the URL just returned works
    assert store.bytes_used() == 300


def test_no_cap_keeps_everything(tmp_path):
    store, metrics = store_with(tmp_path, max_bytes=0)
    ids = [store.save(PNG) for _ in range(20)]
    assert all(exists(store, i) for i in ids) and store.bytes_used() == 2000
    assert metrics.images_evicted.values == {}


def test_the_total_is_counted_at_start_and_the_oldest_files_go_first(tmp_path):
    before, _ = store_with(tmp_path)
    ids = [before.save(PNG) for _ in range(3)]
    for age, image_id in zip((300, 100, 200), ids):  # the oldest by mtime is ids[0], then ids[2]
        t = time.time() - age
        os.utime(tmp_path / f"{image_id}.png", (t, t))
    (tmp_path / "notes.txt").write_bytes(b"y" * 1000)  # not an image: not counted
    store, metrics = store_with(tmp_path, max_bytes=320)  # a restart
    assert store.bytes_used() == 300 and metrics.stored_bytes.values[()] == 300
    store.save(PNG)
    assert [exists(store, i) for i in ids] == [False, True, True]
    store.save(PNG)
    assert [exists(store, i) for i in ids] == [False, True, False]


def test_save_does_not_list_the_folder(tmp_path, monkeypatch):
    store, _ = store_with(tmp_path, max_bytes=250)
    for _ in range(3):
        store.save(PNG)

    def no_listing(*args, **kwargs):
        raise AssertionError("save listed the folder")

    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "listdir", no_listing)
    for _ in range(5):
        store.save(PNG)
    assert store.bytes_used() == 200


def test_clean_removes_expired_images_and_updates_the_total(tmp_path):
    store, metrics = store_with(tmp_path, max_bytes=10_000)
    fresh, stale = store.save(PNG), store.save(PNG * 2)
    old = time.time() - 120
    os.utime(tmp_path / f"{stale}.png", (old, old))
    assert store.clean() == 1
    assert exists(store, fresh) and not exists(store, stale)
    assert store.bytes_used() == 100 and metrics.stored_bytes.values[()] == 100
    assert metrics.images_evicted.values == {}  # expiry is not eviction


def test_clean_corrects_the_total_for_files_removed_by_hand(tmp_path):
    store, _ = store_with(tmp_path)
    kept, gone = store.save(PNG), store.save(PNG)
    (tmp_path / f"{gone}.png").unlink()
    assert store.bytes_used() == 200
    store.clean()
    assert store.bytes_used() == 100 and exists(store, kept)


def test_the_images_of_one_answer_are_never_evicted_by_each_other(tmp_path):
    store, metrics = store_with(tmp_path, max_bytes=250)  # room for two images
    old = store.save(PNG)
    answer = store.save_all([PNG] * 4)  # n=4: all four URLs must work when the answer is sent
    assert all(exists(store, i) for i in answer) and not exists(store, old)
    assert metrics.images_evicted.values[()] == 1
    store.save(PNG)  # the next save brings the folder back within the cap, oldest first
    assert [exists(store, i) for i in answer] == [False, False, False, True]


def test_eviction_of_a_file_already_removed_is_harmless(tmp_path):
    store, metrics = store_with(tmp_path, max_bytes=250)
    first = store.save(PNG)
    store.save(PNG)
    (tmp_path / f"{first}.png").unlink()  # the cleaner got there first
    store.save(PNG)
    assert store.bytes_used() == 200 and metrics.images_evicted.values[()] == 1


def test_reading_an_image_reads_the_opened_file_even_if_it_is_removed_after_the_open(tmp_path, monkeypatch):
    store, _ = store_with(tmp_path)
    image_id = store.save(PNG)
    real_open = ImageStore.open

    def open_then_remove(self, name):
        opened = real_open(self, name)
        (tmp_path / name).unlink()
        return opened

    monkeypatch.setattr(ImageStore, "open", open_then_remove)
    image = store.read(f"{image_id}.png")
    assert image.data == PNG and 0 < image.seconds_left <= 60


# ---- over HTTP --------------------------------------------------------------------------------


@pytest.fixture()
def files_server(tiny_package, tmp_path):
    """A front end serving the hosted files of `tmp_path` (no worker is needed to serve files)."""
    server = thread_server(tiny_package("sd1"), f"127.0.0.1:{free_port()}", tmp_path)
    yield server
    server.stop()


def hosted(server, name: str = "A" * 32 + ".png", data: bytes = PNG) -> str:
    (server.images / name).write_bytes(data)
    return f"{server.url}/v1/images/files/{name}"


def assert_404_object(r: httpx.Response) -> None:
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "image_not_found" and r.json()["error"]["param"] == "image_id"


def test_a_hosted_image_is_served_with_its_expiry_and_an_http_date(files_server):
    r = httpx.get(hosted(files_server))
    assert r.status_code == 200 and r.content == PNG
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-length"] == str(len(PNG))
    assert r.headers["cache-control"].startswith("private, max-age=")
    time.strptime(r.headers["last-modified"], "%a, %d %b %Y %H:%M:%S GMT")


def test_a_file_removed_right_after_it_was_opened_is_still_served_whole(files_server, monkeypatch, caplog):
    url = hosted(files_server)
    real_open = ImageStore.open

    def open_then_remove(self, name):
        opened = real_open(self, name)
        (self.folder / name).unlink()  # the cleaner, between the lookup and the response body
        return opened

    monkeypatch.setattr(ImageStore, "open", open_then_remove)
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == PNG
    assert not (files_server.images / url.rsplit("/", 1)[1]).exists()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_a_file_removed_just_before_it_is_opened_is_a_404_object_without_an_error_log(files_server, monkeypatch, caplog):
    url = hosted(files_server)
    real_open = ImageStore.open

    def remove_then_open(self, name):
        (self.folder / name).unlink()  # the cleaner, between the route's match and the open
        return real_open(self, name)

    monkeypatch.setattr(ImageStore, "open", remove_then_open)
    assert_404_object(httpx.get(url))
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING and rec.name.startswith("kiln")]
    assert str(files_server.images) not in caplog.text


def test_an_expired_file_is_a_404_object(files_server):
    url = hosted(files_server)
    old = time.time() - 61 * 60
    os.utime(files_server.images / url.rsplit("/", 1)[1], (old, old))
    assert_404_object(httpx.get(url))


def test_a_fifo_named_like_an_image_is_a_404_and_does_not_hang(files_server):
    os.mkfifo(files_server.images / ("F" * 32 + ".png"))
    assert_404_object(httpx.get(f"{files_server.url}/v1/images/files/{'F' * 32}.png", timeout=10))


def test_an_image_evicted_by_the_cap_is_a_404_object_and_counted(tiny_package, tmp_path):
    from tests._server import shared_server

    live = shared_server(tiny_package("sd1"))
    capped = thread_server(tiny_package("sd1"), live.worker, tmp_path, images_options={"max_bytes": 1})
    try:
        with capped.client() as c:
            first, second = (c.post("/v1/images/generations", json={"prompt": "x"}).json()["data"][0]["url"] for _ in range(2))
        assert_404_object(httpx.get(first))  # a 1-byte cap keeps only the newest image
        assert httpx.get(second).status_code == 200
        assert capped.metric("kiln_images_evicted_total") == 1
        assert capped.metric("kiln_images_stored_bytes") == (tmp_path / second.rsplit("/", 1)[1]).stat().st_size
    finally:
        capped.stop()
