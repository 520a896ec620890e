"""Routes: POST /v1/images/generations and GET /v1/images/files/{name} (hosted PNGs)."""

from __future__ import annotations

from email.utils import formatdate

import anyio
from litestar import Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from server.auth import OPEN_OPT
from server.images_store import ROUTE as FILES_ROUTE
from server.images_store import ImageStore
from server.openapi_docs import ERROR_RESPONSES, error_spec
from server.forms import read_form
from server.validation import strict_body
from server.protocol import ImageEditRequest, ImageGenerationRequest, ImagesResponse, ImageVariationRequest
from server.serving_images import ImagesService


@post(
    "/v1/images/generations",
    status_code=200,
    summary="Create images from a prompt (OpenAI Images API)",
    responses={200: ResponseSpec(ImagesResponse, description="The images"), **ERROR_RESPONSES},
    tags=["images"],
    before_request=strict_body(ImageGenerationRequest),
)
async def create_images(data: JSONBody[ImageGenerationRequest], request: Request, images: NamedDependency[ImagesService]) -> Response:
    return Response(await images.generate(data, request.receive), media_type="application/json")


@post(
    "/v1/images/edits",
    status_code=200,
    summary="Edit a picture: img2img, or inpainting with a mask (OpenAI Images API, multipart/form-data)",
    description=(
        "Fields: image (a file; or image[] holding one), prompt, mask (a PNG: fully transparent pixels are repainted; "
        "without alpha, white = repaint), model, n, size (default: the input's size), response_format; "
        "Kiln's strength, seed, steps, guidance_scale, negative_prompt, sampler."
    ),
    responses={200: ResponseSpec(ImagesResponse, description="The edited images"), **ERROR_RESPONSES},
    tags=["images"],
)
async def edit_images(request: Request, images: NamedDependency[ImagesService]) -> Response:
    data = await read_form(request, ImageEditRequest)
    return Response(await images.edit(data, request.receive), media_type="application/json")


@post(
    "/v1/images/variations",
    status_code=200,
    summary="Variations of a picture: img2img with no prompt (OpenAI Images API, multipart/form-data)",
    responses={200: ResponseSpec(ImagesResponse, description="The variations"), **ERROR_RESPONSES},
    tags=["images"],
)
async def image_variations(request: Request, images: NamedDependency[ImagesService]) -> Response:
    data = await read_form(request, ImageVariationRequest)
    return Response(await images.variation(data, request.receive), media_type="application/json")


@get(
    FILES_ROUTE + "/{name:str}",
    summary="A hosted image (no API key: the id is unguessable); 404 once it expired",
    media_type="image/png",
    opt={OPEN_OPT: True},
    responses={404: error_spec("Unknown or expired image")},
    tags=["images"],
)
async def image_file(name: FromPath[str], store: NamedDependency[ImageStore]) -> Response:
    # Read in full from a descriptor opened first (server/images_store.py): a file the cleaner
    # removes meanwhile is either served whole or a 404, never a half-sent answer or a 500.
    image = await anyio.to_thread.run_sync(store.read, name)
    headers = {
        "cache-control": f"private, max-age={image.seconds_left}",
        "last-modified": formatdate(image.mtime, usegmt=True),  # an HTTP-date (RFC 9110)
        "content-disposition": "inline",
    }
    return Response(image.data, media_type="image/png", headers=headers)
