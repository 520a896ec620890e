"""A short soak: 60 s at concurrency 8 of mixed chat, n=2, streaming, Images API and edit requests
(benchmarks/soak.py's load, at the test server's 64x64 and 2 steps). No request is lost, every
status is 200 or a retryable 429/503, and the front end's kiln_http_requests_total grew by exactly
what the clients counted. The 10-minute version with memory checks is `make soak`."""

from __future__ import annotations

import asyncio

from benchmarks.soak import MIX, http_counts, run_load, settled_mismatch

DURATION_S = 60
CONCURRENCY = 8


def test_a_minute_of_mixed_load_loses_nothing_and_metrics_match_the_clients(server):
    before = http_counts(server.url)
    load = asyncio.run(run_load(server.url, server.key, DURATION_S, CONCURRENCY, timeout_s=60))
    assert load.lost == []
    assert load.unexpected == {}
    assert {kind for (kind, status) in load.by_kind if status == 200} == set(MIX), load.by_kind
    assert settled_mismatch(server.url, load.answered, before) == {}
