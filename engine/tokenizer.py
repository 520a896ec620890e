"""Tokenize prompts with the package's own tokenizer.json (the `tokenizers` library only)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engine.errors import PackageError
from engine.manifest import TokenizerSpec

log = logging.getLogger(__name__)


class PromptTokenizer:
    """Pads or truncates every prompt to the text encoder's fixed length, as diffusers does."""

    def __init__(self, package: Path, spec: TokenizerSpec):
        path = Path(package) / spec.folder / "tokenizer.json"
        if not path.is_file():
            raise PackageError(f"tokenizer file {path} is missing from the package; re-export it")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on a corrupt file
            raise PackageError(f"cannot read {path}: {e}") from None
        self.max_length = spec.max_length
        self.pad_id = spec.pad_id
        self._tok.no_padding()
        # The tokenizer's own truncation keeps its special tokens (begin/end of text) in place.
        self._tok.enable_truncation(self.max_length)

    def count(self, text: str) -> int:
        """Tokens the text encoder sees for `text`, specials included, after truncation."""
        return len(self._tok.encode(text).ids)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """list of prompts -> (B, max_length) int64 ids."""
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            encoding = self._tok.encode(text)
            if encoding.overflowing:
                log.warning("prompt truncated to the text encoder's %d tokens: %.60r...", self.max_length, text)
            ids = encoding.ids
            out[row, : len(ids)] = ids
        return out
