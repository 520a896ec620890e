"""The input pictures of edits: read from uploads, `data:` URLs or this server's hosted images,
and checked in full before any work, so a bad picture is a 400 naming where it came from.

Remote URLs are never fetched (Kiln is offline, and fetching would let a request make the server
call arbitrary hosts): an `image_url` must be a `data:` URL or one of this server's own hosted
image URLs (read from the image store). The checks are engine/image_input.py's, the same the
worker runs: formats (PNG, JPEG, WebP), the pixel limit, truncation, and the mask's rules.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

import anyio

from engine.errors import InvalidRequestError
from engine.image_input import decode_mask, open_image
from server.errors import BadRequestError, ImageNotFoundError
from server.images_store import ROUTE as FILES_ROUTE
from server.images_store import ImageStore

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_HOSTED_PATH = re.compile(rf"^{re.escape(FILES_ROUTE)}/(?P<name>[A-Za-z0-9_-]+\.png)$")


async def check_edit_inputs(image: bytes, mask: bytes | None, image_param: str, mask_param: str = "mask") -> None:
    """Decode the picture (and mask) in full off the event loop; a 400 naming the field if bad."""

    def check() -> None:
        picture = open_image(image, image_param)
        if mask is not None:
            decode_mask(mask, mask_param, (picture.width, picture.height))

    try:
        await anyio.to_thread.run_sync(check)
    except InvalidRequestError as e:
        raise BadRequestError(str(e), param=e.param) from None


async def image_from_url(url: str, store: ImageStore, param: str) -> bytes:
    """The bytes of an `image_url`: a data: URL, or this server's hosted image; never fetched."""
    if url.startswith("data:"):
        return _from_data_url(url, param)
    path = urlsplit(url).path if "://" in url else url
    hosted = _HOSTED_PATH.match(path)
    if hosted is None:
        raise BadRequestError(
            f"{param}: remote images are not fetched (this server works offline); send the picture as a "
            "data: URL (data:image/png;base64,...) or use an image URL this server returned",
            param=param,
        )
    try:
        # Read through an open descriptor: a file the cleaner removes meanwhile is read whole or not at all.
        return (await anyio.to_thread.run_sync(store.read, hosted.group("name"))).data
    except ImageNotFoundError as e:
        raise BadRequestError(
            f"{param}: the hosted image cannot be read ({e}); send the picture again as a data: URL", param=param
        ) from None


def _from_data_url(url: str, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if m is None:
        raise BadRequestError(f"{param}: a data: URL must be base64, like data:image/png;base64,...", param=param)
    kind = (m.group("type") or "").lower()
    if kind and not kind.startswith("image/"):
        raise BadRequestError(f"{param}: the data: URL holds {kind}, not an image", param=param)
    try:
        return base64.b64decode(m.group("data"), validate=False)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{param}: the data: URL's base64 is invalid", param=param) from None
