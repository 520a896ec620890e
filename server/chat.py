"""Route: POST /v1/chat/completions (parse, call the chat service, encode)."""

from __future__ import annotations

from litestar import Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.response import Stream
from litestar.di import NamedDependency
from litestar.params import JSONBody

from server.errors import request_id_of
from server.openapi_docs import ERROR_RESPONSES
from server.validation import strict_body
from server.protocol import ChatCompletion, ChatCompletionRequest
from server.serving_chat import ChatService


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="Generate images through the chat completions interface",
    description=(
        "The prompt is the last user message. The answer's message content is the n image_url parts, "
        "then one text part. With stream=true: Server-Sent Events of chat.completion.chunk objects."
    ),
    responses={200: ResponseSpec(ChatCompletion, description="The images (or an SSE stream with stream=true)"), **ERROR_RESPONSES},
    tags=["chat"],
    before_request=strict_body(ChatCompletionRequest),
)
async def chat_completions(data: JSONBody[ChatCompletionRequest], request: Request, chat: NamedDependency[ChatService]) -> Response:
    if data.stream:
        stream = await chat.stream(data, request.receive, request_id_of(request.scope))
        return Stream(stream.events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
    return Response(await chat.complete(data, request.receive), media_type="application/json")
