"""Schemathesis fuzzes every operation of the OpenAPI schema the live server publishes, with ALL of
its default checks: no 5xx; status codes, content types, headers and bodies as documented;
schema-violating requests (negative mode) refused with a 4xx; schema-valid requests (positive mode)
accepted; open routes open and the others refusing requests without a key. Bounded: a fixed
number of examples per operation and mode, derandomized, against the shared server whose limits
keep each accepted request cheap.

Positive cases pass through `within_the_domain` first. It changes only what no JSON Schema can
say -- which sizes, samplers and LoRAs the model serving the request accepts (learned from the
workers at run time), that an input picture must decode as one, that `max_tokens` must cover the pictures'
cost, which message holds the prompt -- so that "schema-valid" means "valid" and a 400 on a
positive case is a real disagreement between the schema and the server.

(The cases come from `APIOperation.as_strategy` under Hypothesis' `@given`: schemathesis'
`pytest.from_fixture` loader does not work with this pytest.)
"""

from __future__ import annotations

import base64
import io
import math

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

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
# Operations with no parameters, no body and no key have nothing to make invalid.
NOTHING_TO_NEGATE = {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
CASES = [(m, p, POSITIVE) for m, p in OPERATIONS] + [(m, p, NEGATIVE) for m, p in OPERATIONS if (m, p) not in NOTHING_TO_NEGATE]
INTEGER_FIELDS = ("n", "steps", "seed", "max_tokens", "max_completion_tokens", "preview_every")


def _png(side: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


PICTURE = _png()
PICTURE_URL = "data:image/png;base64," + base64.b64encode(PICTURE).decode("ascii")


def within_the_domain(body: dict) -> None:
    """Make a schema-valid body valid where the schema cannot say what valid is (see the module
    docstring). Changes `body` in place."""
    if "model" in body:
        body["model"] = "gpt-4o"  # a random name is a 404: let valid bodies reach the engine
    for field in INTEGER_FIELDS:
        # JSON Schema's integers include 3.0; the server reads JSON integers (no fraction part)
        if isinstance(body.get(field), float):
            body[field] = int(body[field])
    if body.get("size") not in (None, "auto"):
        body["size"] = "64x64"  # what this model draws depends on its worker's limits
    body.pop("sampler", None)  # the model's samplers are the worker's list
    body.pop("loras", None)  # so are its LoRAs (the shared server's model has none)
    body.pop("max_tokens", None)  # must cover the pictures' cost, which depends on size and n
    body.pop("max_completion_tokens", None)
    if "image" in body:
        body["image"] = PICTURE  # a file that decodes as a picture of a size the model can edit
    if "mask" in body:
        del body["mask"]  # a mask must match the picture's size and leave something to repaint
    if "messages" in body:
        for message in body["messages"]:  # pictures in the conversation must decode
            parts = (message.get("content") if isinstance(message.get("content"), list) else []) + (message.get("images") or [])
            for part in parts:
                if part.get("type") == "image_url":
                    part["image_url"]["url"] = PICTURE_URL
        body["messages"].append({"role": "user", "content": "a red circle"})  # the prompt: the last user message
    # an edit must run at least one step: int(steps * strength) >= 1, where strength is the
    # request's or the route's default (at least 0.5)
    if isinstance(body.get("strength"), (int, float)) and body["strength"] < 1 / 8:
        del body["strength"]
    strength = body.get("strength") or 0.5
    if isinstance(body.get("steps"), int) or body.get("strength"):
        body["steps"] = max(body.get("steps") or 2, math.ceil(1 / strength))  # 2: the model's default


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(live.url + "/schema/openapi.json")


def test_the_fuzzed_list_is_every_published_operation(api_schema):
    published = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize("method, path, mode", CASES, ids=lambda v: getattr(v, "value", v))
def test_every_operation_passes_the_default_checks(api_schema, live, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def fuzz(case):
        if mode is POSITIVE and isinstance(case.body, dict):
            within_the_domain(case.body)
        case.call_and_validate(base_url=live.url, headers=live.headers, timeout=60)  # every default check

    fuzz()
    assert httpx.get(live.url + "/ready").status_code == 200  # and the server is still up


def test_the_schema_states_the_configured_limits(live):
    schema = httpx.get(live.url + "/schema/openapi.json").json()
    components = schema["components"]["schemas"]
    generation = components["ImageGenerationRequest"]["properties"]
    assert generation["n"]["anyOf"][0] == {"description": "Number of images (1..limits.max_n).", "type": "integer", "minimum": 1, "maximum": 2}
    assert generation["prompt"]["maxLength"] == 4000 and generation["prompt"]["pattern"] == r"\S"
    assert generation["seed"]["anyOf"][0]["minimum"] == 0  # zero bounds are kept
    assert components["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edits["required"] == ["image"] and edits["properties"]["image"]["format"] == "binary"
    assert schema["paths"]["/health"]["get"]["security"] == []
    responses = schema["paths"]["/v1/images/generations"]["post"]["responses"]
    for status in ("400", "401", "413", "429", "503", "default"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    last_modified = schema["paths"]["/v1/images/files/{name}"]["get"]["responses"]["200"]["headers"]["last-modified"]
    assert "format" not in last_modified["schema"] and last_modified["schema"]["pattern"].endswith("GMT$")
