"""Multipart form bodies (the Images API's edits and variations) read into typed structs.

The openai client sends files as `image` (one) or `image[]` (a list), scalars as text fields and
its `extra_body` as more text fields. Text fields are converted to the struct's types ("2" -> 2
for `n` is how forms carry numbers), and any field that cannot be is a 400 naming it, as for JSON.
`loras` is a list of objects: the openai client's `extra_body` sends one as `loras[][name]` and
`loras[][scale]` fields; a `loras` field of JSON text is read too (handier with curl).
The body's size limit (server.max_body_bytes) is enforced while the form is read (413).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException

from server.errors import InvalidBodyError
from server.validation import explain

FILE_FIELDS = ("image", "mask")
JSON_FIELDS = ("loras",)  # structured fields: a form carries them as JSON text
LIST_ITEM = re.compile(r"(\w+)\[(\d*)\]\[(\w+)\]")  # loras[][name], loras[0][scale]


async def read_form(request: Request, struct_type: type) -> Any:
    """The multipart body as `struct_type`; files as bytes (`image` always a list)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidBodyError(
            f"this route takes multipart/form-data (got {content_type.split(';')[0] or 'no content type'}): "
            "send the image as a file field, as the openai client's images.edit does",
            param="image",
        )
    try:
        form = await request.form()
    except ClientException as e:
        if e.status_code == 413:
            raise
        raise InvalidBodyError(f"the multipart body could not be read: {e.detail}", param=None) from None
    values: dict[str, Any] = {}
    images: list[tuple[str, Any]] = []
    known = set(struct_type.__struct_fields__)
    listed: dict[str, dict[str, list[str]]] = {}  # loras -> name -> the values of loras[][name]
    for key in form.keys():
        items = form.getall(key)
        item_of = LIST_ITEM.fullmatch(key)
        if item_of and item_of[1] in known:
            listed.setdefault(item_of[1], {}).setdefault(item_of[3], []).extend(items)
            continue
        if key in ("image", "image[]"):
            images += [(key, item) for item in items]
            continue
        if key == "mask[]":
            key = "mask"
        if key not in known:
            continue  # ignored, as unknown JSON fields are (clients send fields of newer APIs)
        if len(items) > 1 or key in values:
            raise InvalidBodyError(f"{key} is given more than once (as {key} or {key}[]); send it once", param=key)
        item = items[0]
        if key in FILE_FIELDS:
            values[key] = await _file(item, key)
        elif isinstance(item, UploadFile):
            values[key] = (await item.read()).decode("utf-8", "replace")
        else:
            values[key] = item
        if key in JSON_FIELDS:
            values[key] = _json_field(key, values[key])
    for field, columns in listed.items():
        if field in values:
            raise InvalidBodyError(f"{field} is given both as JSON text and as {field}[][...] fields; send it once", param=field)
        values[field] = _rows(field, columns)
    if {name for name, _ in images} == {"image", "image[]"}:
        raise InvalidBodyError("send the input as `image` or as `image[]`, not both", param="image")
    values["image"] = [await _file(item, f"image[{i}]" if name == "image[]" else "image") for i, (name, item) in enumerate(images)]
    if not values["image"]:
        raise InvalidBodyError("missing required parameter: 'image' (the picture to edit, as a file)", param="image")
    try:
        return msgspec.convert(values, struct_type, strict=False)
    except msgspec.ValidationError as e:
        message, param = explain(str(e))
        raise InvalidBodyError(message, param=param) from None


def _rows(field: str, columns: dict[str, list[str]]) -> list[dict[str, str]]:
    """loras[][name] = a, b and loras[][scale] = 0.5, 1 -> [{name: a, scale: 0.5}, {name: b, scale: 1}]."""
    counts = {len(v) for v in columns.values()}
    if len(counts) != 1:
        raise InvalidBodyError(
            f"the {field}[][...] fields do not pair up ({', '.join(f'{k}: {len(v)}' for k, v in columns.items())}); "
            f"give every item each field, or send {field} as JSON text",
            param=field,
        )
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _json_field(key: str, text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise InvalidBodyError(
            f"{key} must be JSON text in a form, e.g. [{{\"name\": \"style\", \"scale\": 0.8}}]; got {text[:60]!r}", param=key
        ) from None


async def _file(item: Any, param: str) -> bytes:
    if not isinstance(item, UploadFile):
        raise InvalidBodyError(f"{param} must be a file (a text field was sent): upload the image's bytes", param=param)
    data = await item.read()
    if not data:
        raise InvalidBodyError(f"{param} is empty: send the image file", param=param)
    return data
