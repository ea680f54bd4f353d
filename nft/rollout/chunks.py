"""The torch sampler within a memory budget: a call's prompts split into chunks sized from the budget, and a random
stream per answer, so that the chunks draw the same tokens as one block would.

The one-block sampler draws each step's Gumbel noise from one generator, in answer order among the answers still
alive: an answer's draws depend on which others share its call. Under a budget each answer's noise is a function of
``(seed, answer index in the call, step, token)`` alone (a counter-based hash, SplitMix64's finaliser), so a chunk
computes exactly the noise its answers would get in one block.
"""

from __future__ import annotations

import torch

#: SplitMix64's increment and multipliers, as signed 64-bit integers (torch has no unsigned 64-bit arithmetic)
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser (int64 products wrap around, as the unsigned arithmetic they stand for)."""
    z = (z ^ _shr(z, 30)) * torch.tensor(_MIX1, device=z.device)
    z = (z ^ _shr(z, 27)) * torch.tensor(_MIX2, device=z.device)
    return z ^ _shr(z, 31)


def answer_uniforms(seed: int, answers: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """``(len(answers), vocab)`` float32 uniforms in (0, 1), each a function of ``(seed, answer, step, token)`` only."""
    dev = answers.device
    golden = torch.tensor(_GOLDEN, dtype=torch.long, device=dev)
    key = _mix(torch.tensor(int(seed) % 2**62, dtype=torch.long, device=dev) * 2 + 1 + golden)
    key = _mix(key + torch.tensor(int(step), dtype=torch.long, device=dev) * torch.tensor(_MIX1, device=dev))
    row = _mix(key + answers.long() * golden)  # (B,)
    z = _mix(row[:, None] + torch.arange(vocab, dtype=torch.long, device=dev)[None, :] * golden)
    return (_shr(z, 40).float() + 0.5) * 2.0**-24  # the top 24 bits: never 0 or 1


def bytes_per_answer(config, prompt_len: int, max_new_tokens: int, dtype: torch.dtype) -> int:
    """What one answer of a call holds while it decodes: its KV cache over the prompt and the longest answer, its
    mask row, and its step's vocabulary-sized float32 temporaries (logits, log-probs, noise) and the noise's int64
    counters."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    elem = torch.finfo(dtype).bits // 8
    cap = prompt_len + max_new_tokens
    kv = text.num_hidden_layers * 2 * kv_heads * head_dim * cap * elem
    return kv + cap * (elem + 1) + text.vocab_size * (4 * 4 + 8 * 3)


def bytes_per_prompt(config, prompt_len: int, dtype: torch.dtype) -> int:
    """A prompt's prefill: the activations of one layer over its tokens (hidden states and the MLP's intermediate)."""
    text = config.get_text_config(decoder=True)
    elem = torch.finfo(dtype).bits // 8
    return prompt_len * (4 * text.hidden_size + 3 * text.intermediate_size) * elem


def prompts_per_chunk(config, n: int, prompt_len: int, max_new_tokens: int, dtype, budget_mb: float) -> int:
    """How many prompts (with their ``n`` answers each) one chunk takes within ``budget_mb``; at least one."""
    per = n * bytes_per_answer(config, prompt_len, max_new_tokens, dtype) + bytes_per_prompt(config, prompt_len, dtype)
    return max(1, int(budget_mb * 2**20 // per))
