"""Model construction and the trainer-side log-prob / entropy pass (one code path for tiny and paper models).

The embedded default builds a small ``Qwen2ForCausalLM`` (the class of Qwen2.5-Math) from :class:`ModelConfig`;
the paper presets load a hub-format folder with ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nft.selective import chunked_logprobs, logit_chunk


@dataclass
class ModelConfig:
    """The tiny Qwen2 of the embedded default (the ``model`` section of params.yaml)."""

    hidden_size: int = 64
    """width; 64 with 2 layers is ~0.14M parameters: on 2 CPU cores it trains ~2.5x more steps per second than
    128 x 4 layers and, within the 3-minute warm-start budget, ends up the better base model."""
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    """grouped-query attention, as Qwen2.5."""
    intermediate_size: int = 192
    vocab_size: int = 512
    """target size of the byte-level BPE trained on the synthetic corpus (the trainer may stop earlier)."""
    max_position: int = 512
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.vocab_size < 300:
            raise ValueError(
                f"model.vocab_size: a byte-level BPE needs >= 259 entries plus merges; got {self.vocab_size}"
            )


def build_tiny_qwen2(cfg: ModelConfig, vocab_size: int, special_ids: dict[str, int]):
    """A freshly initialised ``Qwen2ForCausalLM`` (seed torch before calling)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta,  # type: ignore[call-arg]  # legacy kwarg, still taken through **kwargs
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        pad_token_id=special_ids["<|endoftext|>"],
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def model_folder(path: str, key: str) -> list[str]:
    """What a hub-format (``save_pretrained``) model folder lacks of its config, tokenizer and weights, as one line
    naming ``key`` (empty: nothing); ``nft check`` and the ``base`` stage both ask."""
    folder = Path(path)
    if not folder.is_dir():
        return [
            f"{key}: model folder {folder} not found (download it first, e.g. `huggingface-cli download "
            f"Qwen/Qwen2.5-Math-7B --local-dir {folder}`)"
        ]
    lacks = []
    if not (folder / "config.json").is_file():
        lacks.append("config.json")
    if not (folder / "tokenizer_config.json").is_file() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        lacks.append(f"a tokenizer (tokenizer_config.json and one of {', '.join(TOKENIZER_FILES)})")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        lacks.append("weights (*.safetensors or *.bin)")
    return [f"{key}: model folder {folder} lacks {', '.join(lacks)}"] if lacks else []


def load_policy(path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a ``save_pretrained`` folder (local files only: no hub access at run time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tokenizer


def stop_token_ids(tokenizer, stops: str = "chat", generation_eos=None) -> list[int]:
    """End-of-answer tokens. ``chat``: the tokenizer's eos plus Qwen's ``<|im_end|>`` / ``<|endoftext|>`` where
    present; ``eos``: the checkpoint's own eos alone (``generation_eos``, its generation config's ``eos_token_id``,
    else the tokenizer's), where the official rollout stops (vLLM's default)."""
    if stops == "eos":
        eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if not ids:
            raise ValueError("stop_tokens: eos, but the checkpoint names no eos token")
        return sorted(set(ids))
    if stops != "chat":
        raise ValueError(f"stop_tokens: expected chat or eos, got {stops!r}")
    chat = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>"):
        if t in vocab:
            chat.add(vocab[t])
    return sorted(chat)


def pad_id(tokenizer) -> int:
    """The id that pads prompts and answers: the tokenizer's pad token, else its eos, else its first end-of-answer
    token (:func:`stop_token_ids`). Padded positions are masked, so the choice changes no result."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return stop_token_ids(tokenizer)[0]


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """The response mask (float, ``len(lengths) x T``) of rows of these lengths: answers are contiguous from their
    first token."""
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def model_device(model) -> torch.device:
    """Where a model's (or a DeepSpeed engine's) parameters live: inputs are moved there."""
    d = getattr(model, "device", None)
    return torch.device(d) if d is not None else next(model.parameters()).device


def pack(prompt_ids: list[list[int]], response: torch.Tensor, response_mask: torch.Tensor, pad_id: int):
    """Left-pad prompts and append the (right-padded) responses: ``(input_ids, attention_mask, position_ids, Lp)``.

    Every prompt ends at column ``Lp``, so the logits at columns ``Lp - 1 .. Lp + T - 2`` predict the response.
    """
    B, T = response.shape
    Lp = max(len(p) for p in prompt_ids)
    ids = torch.full((B, Lp + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, Lp + T), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, Lp - len(p) : Lp] = torch.tensor(p, dtype=torch.long)
        attn[i, Lp - len(p) : Lp] = 1
    ids[:, Lp:] = torch.where(response_mask > 0, response, torch.full_like(response, pad_id))
    attn[:, Lp:] = (response_mask > 0).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos, Lp


class _Spread(torch.autograd.Function):
    """Rows ``0..n-1`` each repeated ``k`` times in order (``x[inv]`` for ``inv`` = 0,0,..,1,1,..): a copy forward;
    backward sums each row's ``k`` gradients one after another, in index order, as advanced indexing's backward
    (an accumulating index_put) does on one thread, so the gradients are the same bit for bit there (the study's
    setting, ``threads: 1``), but as ``k`` vectorised adds. (An expand's backward, ``sum`` over the answers, adds in
    another order: the embedded study's weights then differ in the last bits.)"""

    @staticmethod
    def forward(ctx, x, k: int):
        ctx.k = k
        return x.unsqueeze(1).expand(x.shape[0], k, *x.shape[1:]).reshape(x.shape[0] * k, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(-1, ctx.k, *grad.shape[1:])  # a view where it can be
        out = g[:, 0].clone()
        for j in range(1, ctx.k):
            out += g[:, j]
        return out, None


def _spreader(inv: torch.Tensor, n: int):
    """``x -> x[inv]`` along the first dimension of tensors of ``n`` rows, with a cheaper backward: :class:`_Spread`
    where the rows are each prompt's answers in order, all prompts with as many (decided once per ``inv``); otherwise
    ``index_select`` (its backward an index_add, in index order: on one thread the same bits as advanced indexing's
    accumulating index_put). Both are several times faster than ``x[inv]``'s backward on CPU (benchmarks/README.md)."""
    b = inv.shape[0]
    if b % n == 0 and b > n and torch.equal(inv, torch.arange(n, device=inv.device).repeat_interleave(b // n)):
        return lambda x: _Spread.apply(x, b // n)
    return lambda x: x.index_select(0, inv)


def _distinct_prompts(prompt_ids, pad_id: int, dev):
    """Each distinct prompt once, left-padded: ``(input_ids, attention_mask, position_ids, inv)`` with ``inv`` the
    row of each answer's prompt."""
    keys = [tuple(p) for p in prompt_ids]
    first: dict[tuple, int] = {}
    for k in keys:
        first.setdefault(k, len(first))
    uniq = list(first)
    inv = torch.tensor([first[k] for k in keys], dtype=torch.long)
    Lp = max(len(p) for p in uniq)
    ids = torch.full((len(uniq), Lp), pad_id, dtype=torch.long)
    attn = torch.zeros((len(uniq), Lp), dtype=torch.long)
    for i, p in enumerate(uniq):
        ids[i, Lp - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, Lp - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(dev), attn.to(dev), pos.to(dev), inv.to(dev)


def _shared_prefix_logits(model, prompt_ids, response, response_mask, pad_id: int):
    """Logits ``[B, T, V]`` predicting each response token, running every distinct prompt once.

    The K answers to a question share its prompt: the prompts are run once (with gradient), their KV cache is
    gathered to the answers' rows, and only the answers run per row. Gradients flow through the cache into the prompt
    computation, so this equals one forward over the packed sequences (tested), at a fraction of the cost when
    prompts are long compared with answers."""
    ids, attn, pos, inv = _distinct_prompts(prompt_ids, pad_id, model_device(model))
    dev = ids.device
    response, response_mask = response.to(dev), response_mask.to(dev)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    spread = _spreader(inv, ids.shape[0])  # not DynamicLayer's batch_select_indices (x[inv]): see _spreader
    for layer in cache.layers:
        layer.keys, layer.values = spread(layer.keys), spread(layer.values)
    B, T = response.shape
    resp_attn = (response_mask > 0).long()
    full_attn = torch.cat([attn[inv], resp_attn], dim=-1)
    resp_pos = pos[inv, -1:] + 1 + torch.arange(T, device=dev)[None, :]
    resp_ids = torch.where(response_mask > 0, response, torch.full_like(response, pad_id))
    out2 = model(
        input_ids=resp_ids, attention_mask=full_attn, position_ids=resp_pos, past_key_values=cache, use_cache=True
    )
    return torch.cat([spread(out.logits[:, -1:, :]), out2.logits[:, :-1, :]], dim=1)


def _hidden(model, **kwargs):
    """``(output, final hidden states)`` of a forward pass whose head runs on the last position only: the decoder's
    post-norm output, taken by a hook. The pass goes through ``model`` itself (a DeepSpeed engine's forward keeps its
    ZeRO bookkeeping)."""
    core = getattr(model, "module", model)
    seen: dict = {}

    def grab(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    hook = core.get_decoder().register_forward_hook(grab)
    try:
        out = model(**kwargs, logits_to_keep=1)
    finally:
        hook.remove()
    return out, seen["h"]


def _shared_prefix_hidden(model, prompt_ids, response, response_mask, pad_id: int):
    """:func:`_shared_prefix_logits` as hidden states ``[B, T, H]`` (the head not applied)."""
    ids, attn, pos, inv = _distinct_prompts(prompt_ids, pad_id, model_device(model))
    dev = ids.device
    response, response_mask = response.to(dev), response_mask.to(dev)
    out, h_prompt = _hidden(model, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    spread = _spreader(inv, ids.shape[0])
    for layer in cache.layers:
        layer.keys, layer.values = spread(layer.keys), spread(layer.values)
    B, T = response.shape
    full_attn = torch.cat([attn[inv], (response_mask > 0).long()], dim=-1)
    resp_pos = pos[inv, -1:] + 1 + torch.arange(T, device=dev)[None, :]
    resp_ids = torch.where(response_mask > 0, response, torch.full_like(response, pad_id))
    _, h_resp = _hidden(
        model,
        input_ids=resp_ids,
        attention_mask=full_attn,
        position_ids=resp_pos,
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([spread(h_prompt[:, -1:, :]), h_resp[:, :-1, :]], dim=1)


def response_logprobs(
    model,
    prompt_ids,
    response,
    response_mask,
    pad_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    shared_prefix: bool = True,
    chunk_mb: float = 0.0,
):
    """Log-probs ``[B, T]`` of the response tokens under ``model`` (and the per-token entropy ``[B, T]``).

    Gradients flow when called outside ``torch.no_grad``. Inputs may live on the CPU; outputs are on the model's
    device. Logits are divided by ``temperature`` (as verl does) so that old and new log-probs refer to the sampling
    distribution. ``shared_prefix`` runs each distinct prompt once (:func:`_shared_prefix_logits`); False packs
    prompt + answer per row (the reference path). ``chunk_mb``: where the pass's fp32 logits would exceed this many
    MB, the head runs over chunks of tokens (:func:`nft.selective.chunked_logprobs`: the same values to rounding,
    memory O(chunk x vocabulary) besides the head's weight gradient); 0 never chunks.
    """
    B, T = response.shape
    core = getattr(model, "module", model)
    chunk = logit_chunk(B * T, core.config.vocab_size, chunk_mb)
    if chunk:
        if shared_prefix:
            hidden = _shared_prefix_hidden(model, prompt_ids, response, response_mask, pad_id)
        else:
            ids, attn, pos, Lp = pack(prompt_ids, response, response_mask, pad_id)
            dev = model_device(model)
            _, h = _hidden(
                model, input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=False
            )
            hidden = h[:, Lp - 1 : Lp + T - 1, :]
        targets = response.to(hidden.device).clamp(min=0)
        logp, entropy = chunked_logprobs(core.get_output_embeddings(), hidden, targets, temperature, chunk)
        return logp, (entropy if with_entropy else None)
    if shared_prefix:
        logits = _shared_prefix_logits(model, prompt_ids, response, response_mask, pad_id).float()
    else:
        ids, attn, pos, Lp = pack(prompt_ids, response, response_mask, pad_id)
        dev = model_device(model)
        out = model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=pos.to(dev), use_cache=False)
        logits = out.logits[:, Lp - 1 : Lp + T - 1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, response.to(logits.device).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
