"""Schemathesis fuzzes every operation of the OpenAPI schema the live server publishes: whatever
it sends -- valid bodies and, in negative mode, wrong types, missing fields and out-of-range
values -- the server never answers 5xx. Bounded: a fixed number of examples per operation and
mode, derandomized, against the shared server whose limits keep each accepted request cheap.

(The cases come from `APIOperation.as_strategy` under Hypothesis' `@given`: schemathesis'
`pytest.from_fixture` loader does not work with this pytest.)
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests._server import shared_server

EXAMPLES = 25  # per operation and mode
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/v1/images/variations"),
    ("GET", "/v1/images/files/{name}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/schema/openapi.json")


def test_the_fuzzed_list_is_every_published_operation(api_schema):
    published = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_input_makes_the_server_fail(api_schema, live, method, path, mode):
    operation = api_schema[path][method]
    with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as client:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def fuzz(case):
            if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "gpt-4o"  # a random name is always 404: let valid bodies reach the engine
            response = case.call(base_url=live.url, headers=live.headers, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        fuzz()
        assert client.get("/ready").status_code == 200  # and the server is still up
