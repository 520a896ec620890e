"""Typed request and response bodies of the OpenAI-compatible API (what Litestar publishes as OpenAPI).

Requests ignore fields they do not know (the openai client sends many), reject wrong types, and
carry Kiln's extension fields (`seed`, `negative_prompt`, `steps`, `guidance_scale`, `sampler`,
`loras`),
which the openai client sends through `extra_body`. Ranges that depend on the configuration
(`n`, `steps`, sizes) are checked in the serving modules, with messages naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from engine.request import MAX_LORAS, LoraChoice

Seed = Annotated[int, Meta(ge=0, le=2**63 - 1, description="Seed of the first image; image k uses seed + k.")]
Steps = Annotated[int, Meta(ge=1, le=150, description="Denoising steps (default: the model's).")]
Guidance = Annotated[float, Meta(ge=0, le=50, description="Classifier-free guidance scale.")]
Count = Annotated[int, Meta(ge=1, description="Number of images (1..limits.max_n).")]
Strength = Annotated[
    float,
    Meta(gt=0, le=1, description="Edits: the share of the denoising schedule re-run on the input, (0, 1]; low keeps more of it."),
]
Size = Annotated[str, Meta(description="WIDTHxHEIGHT, e.g. 1024x1024; see the error message for what a model allows.")]
Loras = Annotated[
    list[LoraChoice],
    Meta(
        max_length=MAX_LORAS,
        description="LoRAs stored with the model, each at its scale (also `<lora:NAME:SCALE>` in the prompt).",
    ),
]


# ---------------------------------------------------------------------------------------------
# Chat completions: request


class ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrl


ContentPart = TextPart | ImageUrlPart


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    images: list[ImageUrlPart] | None = None  # an assistant's pictures in OpenRouter's shape, sent back


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ResponseFormatObject(msgspec.Struct):
    """OpenAI's object form; `{"type": "text"}` means the default, `url`/`b64_json` choose the image form."""

    type: str


class ChatCompletionRequest(msgspec.Struct):
    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    n: Count | None = None
    size: Size | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Kiln: "url" (hosted PNG) or "b64_json" (a data: URL), or OpenAI's {"type": ...} object.
    response_format: str | ResponseFormatObject | None = None
    # Kiln extensions (extra_body in the openai client)
    seed: Seed | None = None
    negative_prompt: str | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    sampler: str | None = None
    preview_every: Annotated[int, Meta(ge=0, le=1000)] | None = None  # stream: a JPEG preview every k steps
    strength: Strength | None = None  # an edit's strength (a conversation with a picture in it)
    loras: Loras | None = None
    # OpenRouter's: ["image", "text"] asks for content as a string and the pictures in message.images
    modalities: list[str] | None = None


# ---------------------------------------------------------------------------------------------
# Chat completions: response


class ImageUrlOut(msgspec.Struct):
    url: str


class ImageUrlContent(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageUrlOut


class TextContent(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class AssistantMessage(msgspec.Struct):
    """The seed's shape: content = the image_url parts, then the text part. With `modalities`
    (OpenRouter's shape): content = the text, images = the image_url parts."""

    content: list[ImageUrlContent | TextContent] | str
    role: str = "assistant"
    images: list[ImageUrlContent] | UnsetType = UNSET


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(msgspec.Struct):
    message: AssistantMessage
    index: int = 0
    finish_reason: str = "stop"
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    seeds: list[int]  # Kiln: the seed of each image, to reproduce it
    object: str = "chat.completion"


# ---------------------------------------------------------------------------------------------
# Chat completions: stream chunks


class ImageUrlDelta(msgspec.Struct, tag_field="type", tag="image_url"):
    """A content part in a delta: the integer `index` lets clients merge parts (openai's stream helper)."""

    index: int
    image_url: ImageUrlOut


class TextDelta(msgspec.Struct, tag_field="type", tag="text"):
    index: int
    text: str


class Delta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: list[ImageUrlDelta | TextDelta] | str | UnsetType = UNSET  # a string in OpenRouter's shape
    images: list[ImageUrlDelta] | UnsetType = UNSET  # OpenRouter's shape


class ChunkChoice(msgspec.Struct):
    delta: Delta
    index: int = 0
    finish_reason: str | None = None
    logprobs: None = None


class StreamProgress(msgspec.Struct):
    """Kiln: denoising progress of one image, sent in chunks whose delta is empty."""

    image_index: int
    step: int
    total_steps: int
    preview: str | UnsetType = UNSET  # data:image/jpeg;base64,... when preview_every asked for one


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None | UnsetType = UNSET  # present (null until the last chunk) with include_usage
    progress: StreamProgress | UnsetType = UNSET
    seeds: list[int] | UnsetType = UNSET


# ---------------------------------------------------------------------------------------------
# Images API


class ImageGenerationRequest(msgspec.Struct):
    prompt: str
    model: str | None = None
    n: Count | None = None
    size: Size | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: str | None = None  # accepted, no effect
    style: str | None = None  # accepted, no effect
    user: str | None = None
    seed: Seed | None = None
    negative_prompt: str | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    sampler: str | None = None
    loras: Loras | None = None


class ImageEditRequest(msgspec.Struct):
    """`POST /v1/images/edits`, multipart/form-data as the openai client sends it.

    `image` holds the files sent as `image` or `image[]` (this model family edits one). The
    gpt-image fields `background`, `quality`, `input_fidelity`, `output_format`, `user` are
    accepted and have no effect: the answer is a PNG."""

    image: list[bytes]
    prompt: str = ""
    mask: bytes | None = None
    model: str | None = None
    n: Count | None = None
    size: Size | None = None
    response_format: Literal["url", "b64_json"] | None = None
    background: str | None = None
    quality: str | None = None
    input_fidelity: str | None = None
    output_format: str | None = None
    user: str | None = None
    stream: bool | None = None
    seed: Seed | None = None
    negative_prompt: str | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None
    sampler: str | None = None
    strength: Strength | None = None
    loras: Loras | None = None  # in a form: JSON text


class ImageVariationRequest(msgspec.Struct):
    """`POST /v1/images/variations` (multipart/form-data): img2img of `image` with no prompt."""

    image: list[bytes]
    model: str | None = None
    n: Count | None = None
    size: Size | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    seed: Seed | None = None
    steps: Steps | None = None
    sampler: str | None = None
    strength: Strength | None = None


class ImageData(msgspec.Struct):
    url: str | UnsetType = UNSET
    b64_json: str | UnsetType = UNSET
    revised_prompt: str | UnsetType = UNSET
    seed: int | UnsetType = UNSET  # Kiln


class ImagesResponse(msgspec.Struct):
    created: int
    data: list[ImageData]


# ---------------------------------------------------------------------------------------------
# Models, health, errors


class Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "kiln"
    object: str = "model"
    # Kiln: the LoRAs a request may choose for this model (`loras`, or <lora:NAME:SCALE> in the prompt)
    loras: list[str] = msgspec.field(default_factory=list)


class ModelList(msgspec.Struct):
    data: list[Model]
    object: str = "list"


class Status(msgspec.Struct):
    status: str


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
