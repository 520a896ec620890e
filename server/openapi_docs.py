"""The published OpenAPI description says what the server enforces.

Routes declare their error responses with `ERROR_RESPONSES` / `error_spec`; `finish(openapi,
config)` then corrects, once at start-up, what Litestar's generator cannot know or gets wrong:

  * request and response bodies are msgspec's own JSON Schema of the protocol structs (Litestar's
    translation drops zero bounds such as `seed >= 0`, and loses the tagged unions);
  * the limits that come from the configuration: `n <= limits.max_n`, `steps <= limits.max_steps`,
    prompts at most `limits.max_prompt_chars` characters, a generation's prompt not blank;
  * the multipart bodies of /v1/images/edits and /v1/images/variations (their routes read the form
    themselves, so Litestar sees no body);
  * security: routes served without a key (server.open_paths, the hosted files) say `security: []`;
    the others document their 401;
  * every operation's `default` response is the OpenAI error object (405, 431, 500, ...), and the
    hosted file's headers are documented as sent (`last-modified` is an HTTP-date, not RFC 3339).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPI
from litestar.openapi.spec.base import BaseSchemaObject

from server import protocol
from server.config import Config
from server.protocol import ErrorResponse

REF = "#/components/schemas/{name}"
ERROR_REF = {"$ref": REF.format(name="ErrorResponse")}
FILES_PATH = "/v1/images/files/{name}"  # server/images_store.py ROUTE + the id
CHAT_FORMATS = ("url", "b64_json", "data_url", "text")  # text: the server's default
MULTIPART = {"/v1/images/edits": protocol.ImageEditRequest, "/v1/images/variations": protocol.ImageVariationRequest}
# An IMF-fixdate (RFC 9110 section 5.6.7), as email.utils.formatdate(usegmt=True) writes it.
HTTP_DATE = r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$"


def error_spec(description: str) -> ResponseSpec:
    return ResponseSpec(ErrorResponse, description=description, generate_examples=False)


ERROR_RESPONSES = {
    400: error_spec("Bad parameter (named in error.param), malformed JSON or wrong type"),
    401: error_spec("Missing or wrong API key"),
    404: error_spec("Unknown model"),
    413: error_spec("Request body over the limit"),
    429: error_spec("The workers' queues are full; see Retry-After"),
    503: error_spec("No worker ready; see Retry-After"),
    504: error_spec("The generation passed the server's deadline"),
}


@dataclass
class Raw(BaseSchemaObject):
    """A part of the description given as plain JSON: published exactly as written."""

    value: dict[str, Any]

    def to_schema(self) -> dict[str, Any]:
        return self.value


def finish(openapi: OpenAPI, config: Config) -> None:
    """Correct `openapi` in place (see the module docstring); call before it is first served."""
    components = _struct_schemas(openapi)
    _apply_limits(components, config)
    openapi.components.schemas = {name: Raw(schema) for name, schema in sorted(components.items())}
    open_paths = tuple(p.rstrip("/") or "/" for p in config.server.open_paths)
    for path, item in list(openapi.paths.items()):
        document = item.to_schema()
        is_open = path == FILES_PATH or any(path == p or path.startswith(p + "/") for p in open_paths)
        for method, operation in document.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            _finish_operation(operation, is_open)
            if path in MULTIPART and method == "post":
                operation["requestBody"] = _multipart_body(MULTIPART[path], config)
            if path == FILES_PATH:
                operation["responses"]["200"] = _hosted_file_response()
                for parameter in operation.get("parameters", ()):
                    if parameter["name"] == "name":  # an id, as server/images_store.py makes them
                        parameter["schema"] = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{32}(\.png)?$"}
            if path == "/v1/chat/completions":
                operation["responses"]["200"]["content"]["text/event-stream"] = {
                    "schema": {"type": "string", "description": "with stream=true: chat.completion.chunk events, then [DONE]"}
                }
        openapi.paths[path] = Raw(document)


def _finish_operation(operation: dict[str, Any], is_open: bool) -> None:
    responses = operation.setdefault("responses", {})
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400:  # Litestar's own 400 has its own shape: ours is the error object
            response["content"] = {"application/json": {"schema": ERROR_REF}}
    if is_open:
        operation["security"] = []
        responses.pop("401", None)
    else:
        responses.setdefault("401", {"description": "Missing or wrong API key", "content": {"application/json": {"schema": ERROR_REF}}})
    responses["default"] = {
        "description": "Any other error (405, 413, 431 request head over server.max_header_bytes, 500, ...): an OpenAI error object",
        "content": {"application/json": {"schema": ERROR_REF}},
    }


def _struct_schemas(openapi: OpenAPI) -> dict[str, dict[str, Any]]:
    """msgspec's JSON Schema of every protocol struct Litestar published, and of what they use."""
    names = sorted(openapi.components.schemas or {})
    types = [getattr(protocol, name) for name in names if isinstance(getattr(protocol, name, None), type)]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    return components


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of an optional field's value (msgspec writes `X | None` as anyOf [X, null])."""
    for option in schema.get("anyOf", ()):
        if option.get("type") != "null":
            return option
    return schema


def _apply_limits(components: dict[str, dict[str, Any]], config: Config) -> None:
    lim = config.limits
    for name in ("ChatCompletionRequest", "ImageGenerationRequest", "ImageEditRequest", "ImageVariationRequest"):
        props = components.get(name, {}).get("properties", {})
        if "n" in props:
            _non_null(props["n"])["maximum"] = lim.max_n
        if "steps" in props:
            _non_null(props["steps"])["maximum"] = lim.max_steps
        for field in ("prompt", "negative_prompt"):
            if field in props:
                _non_null(props[field])["maxLength"] = lim.max_prompt_chars
    generation = components.get("ImageGenerationRequest", {}).get("properties", {})
    if "prompt" in generation:
        generation["prompt"]["pattern"] = r"\S"  # not blank: there is nothing to draw
    # Checked by the chat service with messages of their own (server/serving_chat.py), so typed
    # as plain strings in the protocol.
    chat = components.get("ChatCompletionRequest", {}).get("properties", {})
    if "response_format" in chat:
        for option in chat["response_format"].get("anyOf", ()):
            if option.get("type") == "string":
                option["enum"] = list(CHAT_FORMATS)
    if "ResponseFormatObject" in components:
        components["ResponseFormatObject"]["properties"]["type"]["enum"] = list(CHAT_FORMATS)
    if "modalities" in chat:
        modalities = _non_null(chat["modalities"])
        modalities["items"] = {"enum": ["image", "text"]}
        modalities["contains"] = {"const": "image"}


def _multipart_body(struct: type, config: Config) -> dict[str, Any]:
    """The form fields of an Images API edit or variation: files as binary parts, the rest as text."""
    _, components = msgspec.json.schema_components([struct], ref_template=REF)
    _apply_limits(components, config)
    schema = copy.deepcopy(components[struct.__name__])
    props = schema["properties"]
    picture = {"type": "string", "format": "binary", "description": "A PNG, JPEG or WebP picture"}
    props["image"] = {**picture, "description": "The picture (or send it as image[]; one picture)"}
    if "mask" in props:
        props["mask"] = {**picture, "description": "A PNG the size of the image: transparent pixels are repainted"}
    for field, prop in props.items():  # a form has no null: an absent field is the default
        props[field] = {k: v for k, v in _non_null(prop).items() if k != "default"}
    if "stream" in props:  # the field the openai client sends; streamed edits go through chat
        props["stream"] = {"type": "boolean", "enum": [False], "description": "Only false: stream edits through /v1/chat/completions"}
    schema.pop("title", None)
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": schema, "encoding": {"image": {"contentType": "image/png"}}}},
    }


def _hosted_file_response() -> dict[str, Any]:
    return {
        "description": "The PNG",
        "headers": {
            "cache-control": {"description": "private, max-age=<seconds until it expires>", "schema": {"type": "string"}},
            "last-modified": {
                "description": "When it was written, as an HTTP-date (RFC 9110), e.g. Sun, 06 Nov 1994 08:49:37 GMT",
                "schema": {"type": "string", "pattern": HTTP_DATE},
            },
        },
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    }
