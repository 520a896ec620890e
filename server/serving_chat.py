"""`POST /v1/chat/completions`: the seed contract's image generation through chat messages.

The prompt is the last user message (a string, or its text parts joined by newlines); earlier
turns and system messages are accepted and do not change the image. The answer is one choice whose
content is the n `image_url` parts followed by one `text` part.
"""

from __future__ import annotations

import secrets
import time
from typing import Awaitable, Callable

from server.errors import BadRequestError
from server.generation import Generator, ImageJob, cancel_on_disconnect, image_tokens
from server.metrics import Metrics
from server.models_registry import ModelRegistry
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    ImageUrlContent,
    ImageUrlOut,
    ImageUrlPart,
    ResponseFormatObject,
    TextContent,
    Usage,
)
from server.streaming import ChatStream

ROUTE = "/v1/chat/completions"
Receive = Callable[[], Awaitable[dict]]


def prompt_of(messages: list[ChatMessage]) -> str:
    """The last user message's text."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if message.role != "user":
            continue
        content = message.content
        if isinstance(content, str):
            return content
        if not content:
            raise BadRequestError("the last user message has no content: describe the image", param=f"messages[{i}].content")
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, ImageUrlPart):
                raise BadRequestError(
                    "image inputs are not supported: describe the image to generate in text",
                    param=f"messages[{i}].content[{j}]",
                )
            texts.append(part.text)
        return "\n".join(texts)
    raise BadRequestError("messages has no user message: the prompt is the last message with role 'user'", param="messages")


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


def closing_text(prompt: str, n: int) -> str:
    subject = prompt if len(prompt) <= 200 else prompt[:197] + "..."
    return f"Here is the generated image of: {subject}" if n == 1 else f"Here are the {n} generated images of: {subject}"


class ChatService:
    def __init__(self, registry: ModelRegistry, generator: Generator, metrics: Metrics):
        self.registry, self.generator, self.metrics = registry, generator, metrics

    async def prepare(self, req: ChatCompletionRequest) -> tuple[ImageJob, str]:
        """Validate everything before any work: the job, and the prompt it was made from."""
        model = await self.registry.resolve(req.model)
        prompt = prompt_of(req.messages)
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

    async def complete(self, req: ChatCompletionRequest, receive: Receive) -> ChatCompletion:
        job, prompt = await self.prepare(req)
        result = await cancel_on_disconnect(self.generator.run(job), receive, self.metrics, ROUTE)
        urls = await self.generator.publish(result.images_png, job.response_format)
        content: list[ImageUrlContent | TextContent] = [ImageUrlContent(image_url=ImageUrlOut(url=u)) for u in urls]
        content.append(TextContent(text=closing_text(prompt, job.params.n)))
        return ChatCompletion(
            id=new_id(),
            created=int(time.time()),
            model=req.model,
            choices=[ChatChoice(message=AssistantMessage(content=content))],
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=result.prompt_tokens + job.completion_tokens,
            ),
            seeds=list(result.seeds),
        )

    async def stream(self, req: ChatCompletionRequest, receive: Receive, request_id: str = "-") -> ChatStream:
        """A started stream: errors that come before the first progress event are raised here (a real status)."""
        job, prompt = await self.prepare(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = ChatStream(
            job=job,
            generator=self.generator,
            metrics=self.metrics,
            completion_id=new_id(),
            model=req.model,
            text=closing_text(prompt, job.params.n),
            include_usage=include_usage,
            request_id=request_id,
        )
        await stream.start(receive)
        return stream


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)
