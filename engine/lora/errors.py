"""The errors a LoRA file or a LoRA request can raise; each message names the file, key or value."""

from __future__ import annotations

from engine.errors import InvalidRequestError, KilnError


class LoraError(KilnError):
    """A LoRA cannot be used with this package."""


class LoraFileError(LoraError):
    """The file is not a readable .safetensors file (truncated, not safetensors, a lying header)."""


class LoraMismatchError(LoraError):
    """The LoRA was made for another model: a key names no weight of the package, or a shape differs."""


class LoraNotFoundError(LoraError):
    """No LoRA of that name is stored with the package."""


class LoraScaleError(InvalidRequestError):
    """A LoRA scale outside the documented range."""
