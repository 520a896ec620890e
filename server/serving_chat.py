"""`POST /v1/chat/completions`: the seed contract's image generation through chat messages.

The prompt is the last user message; a picture in the conversation (attached to that message, or
the last one of the history) is edited instead of drawing from scratch: see server/conversation.py
for the rules.

Two answer shapes: the seed contract's (by default), one choice whose content is the n `image_url`
parts followed by one `text` part; and OpenRouter's, when the request's `modalities` include
"image" (or `images.chat_answer` says so): content is the text as a string and `message.images`
holds the n `image_url` parts -- what LiteLLM and the openai SDK's typed models read.
"""

from __future__ import annotations

import secrets
import time
from typing import Awaitable, Callable

from server.conversation import read_conversation
from server.edit_inputs import check_edit_inputs, image_from_url
from server.errors import BadRequestError
from server.generation import Generator, ImageJob, cancel_on_disconnect, image_tokens
from server.images_store import ImageStore
from server.metrics import Metrics
from server.models_registry import ModelRegistry
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ImageUrlContent,
    ImageUrlOut,
    ResponseFormatObject,
    TextContent,
    Usage,
)
from server.streaming import ChatStream

ROUTE = "/v1/chat/completions"
MODALITIES = ("image", "text")
Receive = Callable[[], Awaitable[dict]]


def image_format(value: str | ResponseFormatObject | None) -> str | None:
    """'url' or 'b64_json' (a data: URL), None for the server's default."""
    kind = value.type if isinstance(value, ResponseFormatObject) else value
    if kind is None or kind == "text":
        return None
    if kind in ("url", "b64_json"):
        return kind
    if kind == "data_url":
        return "b64_json"
    raise BadRequestError(
        f"response_format {kind!r} is not supported: use 'url' (hosted PNG) or 'b64_json' (data: URL)",
        param="response_format",
    )


def closing_text(prompt: str, n: int, edited: bool = False) -> str:
    subject = prompt if len(prompt) <= 200 else prompt[:197] + "..."
    made = "edited" if edited else "generated"
    if not subject.strip():
        return f"Here is the {made} image." if n == 1 else f"Here are the {n} {made} images."
    return f"Here is the {made} image of: {subject}" if n == 1 else f"Here are the {n} {made} images of: {subject}"


class ChatService:
    def __init__(
        self, registry: ModelRegistry, generator: Generator, metrics: Metrics, store: ImageStore, default_shape: str = "content_parts"
    ):
        self.registry, self.generator, self.metrics, self.store = registry, generator, metrics, store
        self.default_shape = default_shape

    async def prepare(self, req: ChatCompletionRequest) -> tuple[ImageJob, str]:
        """Validate everything before any work: the job, and the prompt it was made from."""
        model = await self.registry.resolve(req.model)
        ask = read_conversation(req.messages)
        prompt, image, image_param = ask.prompt, None, "image"
        if ask.picture is not None:
            image_param = ask.picture.param
            image = await image_from_url(ask.picture.url, self.store, image_param)
            await check_edit_inputs(image, None, image_param)
        job = self.generator.job(
            model=model,
            prompt=prompt,
            size=req.size,
            n=req.n,
            temperature=req.temperature,
            seed=req.seed,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            sampler=req.sampler,
            response_format=image_format(req.response_format),
            preview_every=(req.preview_every or 0) if req.stream else 0,
            image=image,
            # strength is an edit's setting; a conversation without a picture draws from scratch
            strength=req.strength if image is not None else None,
            image_param=image_param,
            loras=req.loras,
        )
        param, limit = (
            ("max_completion_tokens", req.max_completion_tokens)
            if req.max_completion_tokens is not None
            else ("max_tokens", req.max_tokens)
        )
        if limit is not None and limit < job.completion_tokens:
            p = job.params
            raise BadRequestError(
                f"{param} is {limit}, but this request needs {job.completion_tokens} completion tokens "
                f"({p.n} image(s) at {p.width}x{p.height}, {image_tokens(p.width, p.height)} tokens each); "
                f"raise {param} to at least {job.completion_tokens} or leave it out",
                param=param,
            )
        return job, prompt

    def answer_shape(self, req: ChatCompletionRequest) -> str:
        """"message_images" (OpenRouter's) when the request's `modalities` include "image", the
        server's default (`images.chat_answer`) without `modalities`; a 400 for modalities this
        model does not produce."""
        if req.modalities is None:
            return self.default_shape
        unknown = [m for m in req.modalities if m not in MODALITIES]
        if unknown or "image" not in req.modalities:
            raise BadRequestError(
                f"modalities {req.modalities!r}: this model only makes images (with a text line); "
                'ask for ["image", "text"], or leave modalities out',
                param="modalities",
            )
        return "message_images"

    async def complete(self, req: ChatCompletionRequest, receive: Receive) -> ChatCompletion:
        shape = self.answer_shape(req)
        job, prompt = await self.prepare(req)
        result = await cancel_on_disconnect(self.generator.run(job), receive, self.metrics, ROUTE)
        urls = await self.generator.publish(result.images_png, job.response_format)
        pictures = [ImageUrlContent(image_url=ImageUrlOut(url=u)) for u in urls]
        text = closing_text(prompt, job.params.n, job.params.is_edit)
        if shape == "message_images":
            message = AssistantMessage(content=text, images=pictures)
        else:
            message = AssistantMessage(content=[*pictures, TextContent(text=text)])
        prompt_tokens = result.prompt_tokens + job.input_image_tokens
        return ChatCompletion(
            id=new_id(),
            created=int(time.time()),
            model=req.model,
            choices=[ChatChoice(message=message)],
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=prompt_tokens + job.completion_tokens,
            ),
            seeds=list(result.seeds),
        )

    async def stream(self, req: ChatCompletionRequest, receive: Receive, request_id: str = "-") -> ChatStream:
        """A started stream: errors that come before the first progress event are raised here (a real status)."""
        shape = self.answer_shape(req)
        job, prompt = await self.prepare(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = ChatStream(
            job=job,
            generator=self.generator,
            metrics=self.metrics,
            completion_id=new_id(),
            model=req.model,
            text=closing_text(prompt, job.params.n, job.params.is_edit),
            include_usage=include_usage,
            request_id=request_id,
            shape=shape,
        )
        await stream.start(receive)
        return stream


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)
