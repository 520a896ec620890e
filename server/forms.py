"""Multipart form bodies (the Images API's edits and variations) read into typed structs.

The openai client sends files as `image` (one) or `image[]` (a list), scalars as text fields and
its `extra_body` as more text fields. Text fields are converted to the struct's types ("2" -> 2
for `n` is how forms carry numbers; `loras` is JSON text, as the openai client sends a list in
`extra_body`), and any field that cannot be is a 400 naming it, as for JSON.
The body's size limit (server.max_body_bytes) is enforced while the form is read (413).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException

from server.errors import InvalidBodyError
from server.validation import explain

FILE_FIELDS = ("image", "mask")
JSON_FIELDS = ("loras",)  # structured fields: a form carries them as JSON text


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
    for key in form.keys():
        items = form.getall(key)
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
