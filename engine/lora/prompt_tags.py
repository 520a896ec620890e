"""The `<lora:NAME:SCALE>` prompt syntax of AUTOMATIC1111 and ComfyUI, taken out of a prompt.

`<lora:style:0.8>` asks for the LoRA stored as `style` at scale 0.8; `<lora:style>` at 1.0. A tag
is removed from the prompt before it is tokenised (the text encoder never sees it), and several
may be given. Only the prompt is read: as in AUTOMATIC1111, a tag in the negative prompt is text.
(A1111's `<lora:NAME:TE:UNET>` form, separate text-encoder and UNet scales, is refused by name
rather than half-applied.)

No numpy here: the front end, the wire and the worker all run this.
"""

from __future__ import annotations

import re

from engine.errors import InvalidRequestError

TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
OPENING = re.compile(r"<lora:", re.IGNORECASE)


def take_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its tags, [(name, scale), ...] in order of appearance)."""
    found: list[tuple[str, float]] = []
    for match in TAG.finditer(prompt):
        found.append(_read_tag(match.group(0), match.group(1)))
    if not found and not OPENING.search(prompt):
        return prompt, []
    # Removing a tag leaves its spaces behind; CLIP's tokenizer folds runs of whitespace anyway,
    # so folding them here changes no token and keeps the prompt that is logged readable.
    cleaned = " ".join(TAG.sub(" ", prompt).split())
    if OPENING.search(cleaned):
        # A tag inside a tag ("<lora:<lora:a>b>") leaves a new one behind: refused, so that the
        # front end and the worker, which both take tags out, always agree on what was asked.
        raise InvalidRequestError(f"a <lora:...> tag is not closed or holds another tag: {prompt[:120]!r}", param="prompt")
    return cleaned, found


def _read_tag(tag: str, body: str) -> tuple[str, float]:
    parts = [p.strip() for p in body.split(":")]
    if not parts[0]:
        raise InvalidRequestError(f"{tag} names no LoRA: write <lora:NAME> or <lora:NAME:0.8>", param="prompt")
    if len(parts) == 1:
        return parts[0], 1.0
    if len(parts) > 2:
        raise InvalidRequestError(
            f"{tag}: Kiln takes one scale per LoRA (<lora:{parts[0]}:0.8>), not separate text-encoder and UNet scales",
            param="prompt",
        )
    try:
        return parts[0], float(parts[1])
    except ValueError:
        raise InvalidRequestError(f"{tag}: the scale {parts[1]!r} is not a number (write <lora:{parts[0]}:0.8>)", param="prompt") from None
