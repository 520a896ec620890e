"""The default model's word-level tokenizer, saved so `PreTrainedTokenizerFast` and plain
`tokenizers` both load it.

Lower-cased, split on whitespace and punctuation; a word outside the vocabulary (any other word,
emoji, other scripts) becomes [UNK]. Every sequence is [BOS] words [EOS], padded with [PAD] to
MAX_LENGTH tokens; longer ones are truncated, keeping [EOS].
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

from .captions import vocabulary

MAX_LENGTH = 20
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0..3


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    tok.add_special_tokens(list(SPECIALS))
    tok.enable_truncation(MAX_LENGTH)
    tok.enable_padding(pad_id=vocab[PAD], pad_token=PAD, length=MAX_LENGTH)
    return tok


def save_tokenizer(folder: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    specials = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_LENGTH,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def load_tokenizer(folder: Path):
    """The saved tokenizer as diffusers' pipeline loads it (`PreTrainedTokenizerFast`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def token_ids(tokenizer, prompts: list[str]):
    """(B, MAX_LENGTH) int64 ids exactly as StableDiffusionPipeline.encode_prompt makes them."""
    return tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
