"""A small byte-level BPE tokenizer with Qwen2's conventions, trained locally with ``tokenizers``.

transformers 5.x loads any folder whose config says ``model_type: qwen2`` through ``Qwen2Tokenizer``, which rebuilds
the pipeline from ``vocab.json`` + ``merges.txt`` (NFC, Qwen2's split regex, byte-level). Training with exactly that
pipeline makes the saved tokenizer load faithfully through ``AutoTokenizer`` (tested in ``tests/data``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .prompts import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_bpe(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (Qwen2 pre-tokenisation: digits split one by one) on ``corpus``."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_as_qwen2(tok: Tokenizer, out: str | Path) -> None:
    """Write vocab.json, merges.txt, tokenizer.json and a tokenizer_config.json naming Qwen2Tokenizer and the chat
    template; ``AutoTokenizer.from_pretrained(out)`` loads it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.json + merges.txt
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "errors": "replace",
        "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
