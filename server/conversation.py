"""What a chat conversation asks for: the prompt, and the picture to edit if there is one.

Rules (documented in the README):
  - The prompt is the last user message's text (a string, or its text parts joined by newlines).
  - The picture edited is the latest one in the conversation: one attached to the last user
    message (at most one: this model family edits one image), else the last `image_url` part of
    any earlier message (in its content, or in an assistant message's `images`, OpenRouter's
    shape), newest first -- typically the picture Kiln answered with, sent back as the
    assistant's history, so "now on a green background" changes the last picture.
  - No picture anywhere: text-to-image, as before.
System, developer and tool messages are accepted and do not change the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import BadRequestError
from server.protocol import ChatMessage, ImageUrlPart


@dataclass(frozen=True)
class PictureRef:
    url: str
    param: str  # messages[i].content[j], for errors
    attached: bool  # True: sent with the last user message; False: from the conversation's history


@dataclass(frozen=True)
class ChatAsk:
    prompt: str
    picture: PictureRef | None


def read_conversation(messages: list[ChatMessage]) -> ChatAsk:
    last_user = _last_user_index(messages)
    prompt, attached = _prompt_and_pictures(messages[last_user], last_user)
    if len(attached) > 1:
        raise BadRequestError(
            f"the last user message attaches {len(attached)} images; this model edits one picture at a time",
            param=attached[1].param,
        )
    if attached:
        return ChatAsk(prompt, attached[0])
    for i in range(last_user - 1, -1, -1):
        found = _pictures_of(messages[i], i)
        if found:
            return ChatAsk(prompt, found[-1])
    return ChatAsk(prompt, None)  # an empty prompt is refused with the request's other checks


def _pictures_of(message: ChatMessage, i: int) -> list[PictureRef]:
    """A history message's pictures, in order: image_url parts of its content, then its `images`
    (OpenRouter's shape of an assistant answer)."""
    found = []
    if isinstance(message.content, list):
        found += [
            PictureRef(part.image_url.url, f"messages[{i}].content[{j}]", attached=False)
            for j, part in enumerate(message.content)
            if isinstance(part, ImageUrlPart)
        ]
    for j, part in enumerate(message.images or ()):
        found.append(PictureRef(part.image_url.url, f"messages[{i}].images[{j}]", attached=False))
    return found


def _last_user_index(messages: list[ChatMessage]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            return i
    raise BadRequestError("messages has no user message: the prompt is the last message with role 'user'", param="messages")


def _prompt_and_pictures(message: ChatMessage, i: int) -> tuple[str, list[PictureRef]]:
    content = message.content
    if isinstance(content, str):
        return content, []
    if not content:
        raise BadRequestError("the last user message has no content: describe the image", param=f"messages[{i}].content")
    texts, pictures = [], []
    for j, part in enumerate(content):
        if isinstance(part, ImageUrlPart):
            pictures.append(PictureRef(part.image_url.url, f"messages[{i}].content[{j}]", attached=True))
        else:
            texts.append(part.text)
    return "\n".join(texts), pictures
