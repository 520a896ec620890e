"""Routes: the playground page at / and /playground, and its static files under /playground/.

The page is open (no API key): it holds no secrets, and its calls to /v1 carry the key the person
types, like any client's. Everything it needs is in `server/playground/` (vanilla ES modules, no
build step, nothing fetched from the internet), served with a strict Content-Security-Policy:
scripts and styles from this origin only (no inline code or event handlers), pictures from this
origin and `data:` URLs (base64 answers, previews, dropped files), no frames, no plugins.
"""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

from server.auth import OPEN_OPT

STATIC = Path(__file__).resolve().parent / "playground"
ASSETS_ROUTE = "/playground"
PAGE_PATHS = ["/", "/playground"]

CSP = "; ".join(
    [
        "default-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",  # the page's forms are handled by its script, never submitted
        "frame-ancestors 'none'",
    ]
)
MEDIA_TYPES = {  # Litestar adds "; charset=utf-8" to text types
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidate: an upgraded server serves its own page at once
}


def _file(name: str) -> Response:
    path = STATIC / name
    media_type = MEDIA_TYPES.get(path.suffix)
    # `name` is one path segment (the route cannot match a '/'), so it cannot leave STATIC.
    if media_type is None or name.startswith(".") or not path.is_file():
        raise NotFoundException(f"no playground file {name!r}")
    return Response(path.read_bytes(), media_type=media_type, headers=HEADERS)


@get(PAGE_PATHS, opt={OPEN_OPT: True}, include_in_schema=False)
async def page() -> Response:
    """The playground: try the model in a browser through the public API."""
    return _file("index.html")


@get(ASSETS_ROUTE + "/{name:str}", opt={OPEN_OPT: True}, include_in_schema=False)
async def asset(name: FromPath[str]) -> Response:
    """The page's scripts, style sheet and icon."""
    return _file(name)


route_handlers = [page, asset]
