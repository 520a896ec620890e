"""Turn a checkpoint's tokenizer folder into the single `tokenizer.json` the engine reads.

The engine tokenizes with the `tokenizers` library alone; transformers' fast tokenizer (converted
from CLIP's vocab.json + merges.txt where needed) serialises the whole pipeline — normaliser,
pre-tokenizer, BPE or word-level model, special tokens — into that one file.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import CheckpointError
from engine.manifest import TokenizerSpec


def write_tokenizer(checkpoint_folder: Path, package: Path, folder_name: str) -> TokenizerSpec:
    from transformers import AutoTokenizer

    src = checkpoint_folder / folder_name
    try:
        tok = AutoTokenizer.from_pretrained(src, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the tokenizer in {src}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{src} has no fast-tokenizer form; Kiln needs one to write tokenizer.json")
    dest = package / folder_name
    dest.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(dest / "tokenizer.json"))
    max_length = int(tok.model_max_length)
    if max_length > 10_000:  # transformers' "unlimited" sentinel: CLIP's text encoders take 77
        max_length = 77
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerSpec(folder=folder_name, max_length=max_length, pad_id=int(pad_id))
