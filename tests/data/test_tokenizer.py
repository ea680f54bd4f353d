"""The tiny tokenizer round-trips through AutoTokenizer; the chat template renders the Qwen2.5-Math format."""

import pytest
from transformers import AutoTokenizer, Qwen2Config

from nft.data.prompts import SYSTEM_PROMPT, render_prompt
from nft.data.synthetic import SyntheticConfig, build_splits
from nft.data.tokenizer import SPECIAL_TOKENS, save_as_qwen2, train_bpe
from nft.pretrain import prompt_text


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    splits = build_splits(SyntheticConfig(train_size=2000, eval_size=60))
    corpus = [prompt_text(p.question) + p.solution + "<|im_end|>\n" for p in splits["train"]]
    out = tmp_path_factory.mktemp("tok")
    save_as_qwen2(train_bpe(corpus, 400), out)
    Qwen2Config(vocab_size=400).save_pretrained(out)  # model_type qwen2, as a real checkpoint folder
    return AutoTokenizer.from_pretrained(out, local_files_only=True), splits


def test_every_character_round_trips(tokenizer):
    tok, splits = tokenizer
    chars = sorted({c for items in splits.values() for p in items for c in p.question + p.solution + p.answer})
    chars += list(" \n\t{}\\$^_!?'\"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyzé→√π")
    text = "".join(chars)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for p in splits["synth-hard"][:50]:
        full = render_prompt(tok, p.question) + p.solution + "<|im_end|>"
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == full
        assert max(ids) < len(tok)


def test_special_tokens_are_single_ids(tokenizer):
    tok, _ = tokenizer
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_known_prompt(tokenizer):
    tok, _ = tokenizer
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tok, "What is 2 + 3?") == expected
    assert prompt_text("What is 2 + 3?") == expected
    # the template's default system turn is the same instruction (Qwen2.5-Math behaviour)
    no_system = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert no_system == expected
    assert SYSTEM_PROMPT in expected
