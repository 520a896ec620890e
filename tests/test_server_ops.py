"""Operations against the live server: open health/ready/metrics, Prometheus metrics, request ids,
structured access logs without secrets, the published OpenAPI schema, hosted image files."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from server.images_store import ImageStore
from tests._server import API_KEY, MODEL, SECOND_KEY, shared_server, thread_server


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


def test_health_ready_and_metrics_need_no_key(live):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live.url + "/ready").json() == {"status": "ready"}
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_metrics_count_requests_images_latency_and_queue(live):
    images_before = live.metric("kiln_images_generated_total", model=MODEL)
    with live.client() as c:
        assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}).status_code == 200
        c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    text = httpx.get(live.url + "/metrics").text
    assert live.metric("kiln_images_generated_total", model=MODEL) == images_before + 2
    assert re.search(r'kiln_http_requests_total\{route="/v1/chat/completions",method="POST",status="404"\} [1-9]', text)
    assert re.search(r'kiln_http_request_duration_seconds_bucket\{route="/v1/chat/completions",le="\+Inf"\} [1-9]', text)
    assert "kiln_generation_seconds_count" in text
    assert "kiln_generation_queue_depth 0" in text
    for name in ("kiln_rejections_total", "kiln_cancellations_total", "kiln_hosted_images", "kiln_workers_ready 1"):
        assert name in text
    assert f'kiln_worker_queue_images{{worker="{live.worker}"}} 0' in text  # the worker's own queue


def test_request_id_is_returned_and_a_safe_client_id_is_kept(live):
    r = httpx.get(live.url + "/health")
    assert re.fullmatch(r"req_[0-9a-f]{24}", r.headers["x-request-id"])
    assert httpx.get(live.url + "/health", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    unsafe = httpx.get(live.url + "/health", headers={"x-request-id": "a b\tc"}).headers["x-request-id"]
    assert unsafe.startswith("req_")


def test_access_log_has_one_line_per_request_and_no_secret(live):
    with live.client() as c:
        c.get("/v1/models", headers={"x-request-id": "log-check-1"})
        url = c.post("/v1/images/generations", json={"prompt": "x"}).json()["data"][0]["url"]
    image_id = url.rsplit("/", 1)[1].removesuffix(".png")
    httpx.get(url)
    httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer wrong-but-secret-key", "x-request-id": "log-check-2"})
    live.wait_log("request_id=log-check-2 ", timeout=30)  # the last request's line: every earlier one is written
    log = live.log.read_text()
    [line] = [line for line in log.splitlines() if "request_id=log-check-1" in line]
    assert "method=GET path=/v1/models route=/v1/models status=200 duration_ms=" in line
    for secret in (API_KEY, SECOND_KEY, "wrong-but-secret-key", image_id):
        assert secret not in log


def test_openapi_schema_is_published_with_the_api_routes(live):
    schema = httpx.get(live.url + "/schema/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/images/generations", "/v1/models", "/v1/models/{model}"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "max_tokens", "temperature", "n", "size", "stream", "seed", "steps"} <= set(request)


def test_public_base_url_is_used_for_hosted_images(live, tiny_package, tmp_path):
    """Behind a reverse proxy the URLs name the proxy; the files are still served at the same path."""
    proxied = thread_server(tiny_package("sd1"), live.worker, tmp_path, server={"public_url": "https://kiln.example.com/"})
    try:
        with proxied.client() as c:
            url = c.post("/v1/images/generations", json={"prompt": "x"}).json()["data"][0]["url"]
            assert url.startswith("https://kiln.example.com/v1/images/files/") and url.endswith(".png")
            assert c.get(url.removeprefix("https://kiln.example.com")).headers["content-type"] == "image/png"
    finally:
        proxied.stop()


def test_hosted_image_ids_carry_at_least_128_random_bits(tmp_path):
    store = ImageStore(tmp_path, ttl_s=60, public_url="https://kiln.example.com/")
    ids = {store.save(b"png") for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)  # 32 x 6 = 192 bits
    some = next(iter(ids))
    assert store.url(some) == f"https://kiln.example.com/v1/images/files/{some}.png"


def test_cleaner_removes_expired_images_only(tmp_path):
    import os

    store = ImageStore(tmp_path, ttl_s=60, public_url="http://h")
    fresh, stale = store.save(b"a"), store.save(b"b")
    old = time.time() - 120
    os.utime(tmp_path / f"{stale}.png", (old, old))
    assert store.clean() == 1
    assert store.path(fresh + ".png").read_bytes() == b"a"
    assert not (tmp_path / f"{stale}.png").exists()
