"""The sampler's KV cache and decoding attention: a cache preallocated for every answer's rows and the longest
answer, written in place (:class:`SlabCache`), compaction of finished rows (:func:`_compaction`), and the attention
of one decoding step on its views (:func:`_decode_sdpa`, registered with transformers as :data:`DECODE_ATTENTION`),
cascade attention included (:func:`_cascade`: each prompt's keys and values read once per prompt, not once per
answer, where :data:`CASCADE_MIN_BYTES` says it pays).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

#: how one decoding step's attention serves grouped query heads, by device type: "gqa" lets SDPA do it
#: (``enable_gqa``), "fold" turns the G query heads of a key/value head into G query positions of one head (no copy
#: of the cache), "repeat" copies each key/value head G times; "transformers" leaves the attention and its per-step
#: mask to transformers (still on the preallocated cache). The fastest per device (benchmarks/README.md): on 2 CPU cores
#: "gqa"; on an H100 (bf16) "transformers", 2.7x faster than "fold" or "repeat" with the prepared additive mask.
DECODE_GQA = {"cpu": "gqa", "cuda": "transformers"}


#: cascade decoding (:func:`_cascade`) is used when the prompts' keys and values that plain decoding would read more
#: than once per step (answers beyond the first of each prompt x prompt positions, per layer) exceed this many bytes
#: (``benchmarks/cascade.py`` on 2 CPU cores, benchmarks/README.md: faster from about 5 MiB, the same tokens; inside
#: the noise below).
CASCADE_MIN_BYTES = 4 << 20


def repeated_prompt_bytes(model, prompts: int, n: int, prompt_len: int) -> int:
    """Bytes of prompt keys/values that plain decoding reads more than once per layer and step: the answers beyond
    the first of each of ``prompts`` prompts, each re-reading ``prompt_len`` positions (what cascade decoding saves)."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return prompts * (n - 1) * prompt_len * cfg.num_key_value_heads * head_dim * 2 * itemsize


class SharedPrefix:
    """What a cascade decoding step needs besides the layer's own views (passed through transformers as the "mask"):
    the cache (its layers hold the prompts' keys and values once), each slot's answer (``alive``: slot -> answer
    index ``prompt * k + j``), the answers per prompt and the prompts' additive padding mask ``(P, Lp)``."""

    def __init__(self, cache, alive: torch.Tensor, k: int, bias: torch.Tensor, compacted: bool):
        self.cache, self.alive, self.k, self.bias, self.compacted = cache, alive, k, bias, compacted


def _cascade(query, key, value, sp: SharedPrefix, layer_idx: int, scaling):
    """One decoding step's attention with the prompt read once per prompt, not once per answer (cascade attention,
    as vLLM's for a shared prefix): the K x G queries of a prompt's answers meet its keys in one product, each answer
    meets its own keys, and one softmax runs over both parts (exact: the same sums, in another order).

    ``query (n, h, 1, d)``; ``key``/``value``: the answers' own positions ``(n, h_kv, t, d)``."""
    n, h, _, d = query.shape
    hk = key.shape[1]
    g = h // hk
    kp, vp = sp.cache.layers[layer_idx].prefix()
    P, Lp, K = kp.shape[0], kp.shape[2], sp.k
    scale = scaling if scaling is not None else d**-0.5
    q = query.view(n, hk, g, d)
    if sp.compacted:  # slots -> the (prompt, answer) grid; holes stay zero and are never read back
        grid = q.new_zeros((P * K, hk, g, d))
        grid[sp.alive] = q
    else:
        grid = q
    qp = grid.view(P, K, hk, g, d).transpose(1, 2).reshape(P, hk, K * g, d)
    s_pre = torch.matmul(qp, kp.transpose(-1, -2)).mul_(scale).add_(sp.bias[:, None, None, :])  # (P, hk, K g, Lp)
    s_pre = s_pre.view(P, hk, K, g, Lp).transpose(1, 2).reshape(P * K, hk, g, Lp)
    if sp.compacted:
        s_pre = s_pre[sp.alive]
    s_own = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)  # (n, hk, g, t)
    p = torch.cat([s_pre, s_own], dim=-1).softmax(dim=-1)
    p_pre = p[..., :Lp]
    if sp.compacted:
        full = p.new_zeros((P * K, hk, g, Lp))
        full[sp.alive] = p_pre
        p_pre = full
    o_pre = torch.matmul(p_pre.reshape(P, K, hk, g, Lp).transpose(1, 2).reshape(P, hk, K * g, Lp), vp)
    dv = vp.shape[-1]
    o_pre = o_pre.view(P, hk, K, g, dv).transpose(1, 2).reshape(P * K, hk, g, dv)
    if sp.compacted:
        o_pre = o_pre[sp.alive]
    out = o_pre + torch.matmul(p[..., Lp:], value)  # (n, hk, g, dv)
    return out.view(n, 1, h, dv)


def _decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of one decoding step (one query position per row) on the cache views with the prepared additive key
    mask; grouped query heads as :data:`DECODE_GQA` says (transformers' ``sdpa`` repeats every key and value head
    whenever a mask is given: a copy of the whole cache per layer per step). A :class:`SharedPrefix` in place of the
    mask runs :func:`_cascade`."""
    if isinstance(attention_mask, SharedPrefix):
        return _cascade(query, key, value, attention_mask, module.layer_idx, scaling), None
    b, h, q, d = query.shape
    g = h // key.shape[1]
    mode = "none" if g == 1 else DECODE_GQA.get(query.device.type, "repeat")
    if mode == "fold" and q == 1:  # (b, h, 1, d) -> (b, h_kv, g, d): g query positions against their shared head
        out = F.scaled_dot_product_attention(
            query.view(b, h // g, g, d), key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        ).view(b, h, 1, d)
    elif mode == "gqa":
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
    else:
        if g > 1:
            key, value = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
    return out.transpose(1, 2).contiguous(), None


DECODE_ATTENTION = "nft_decode_sdpa"
AttentionInterface.register(DECODE_ATTENTION, _decode_sdpa)


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a buffer of ``rows`` x ``capacity`` positions, written in place.

    ``update`` writes the new positions of the first ``n`` rows and returns views of the filled part (no copy, no
    concatenation); ``batch_repeat_interleave`` spreads the prefilled prompts over their answers' rows once;
    ``move_rows`` copies the given rows into other slots (compaction of finished rows)."""

    def __init__(self, rows: int, capacity: int):
        super().__init__()
        self.rows, self.capacity, self.length = rows, capacity, 0
        self.shared = 0  # > 0: the first ``shared`` positions of the first P rows hold the P prompts (cascade)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        h, d, dv = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = torch.empty((self.rows, h, self.capacity, d), dtype=self.dtype, device=self.device)
        self.values = torch.empty((self.rows, h, self.capacity, dv), dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = key_states.shape[0], key_states.shape[-2]
        if self.length + q > self.capacity:
            raise RuntimeError(f"SlabLayer: {self.length + q} positions exceed the capacity {self.capacity}")
        self.keys[:n, :, self.length : self.length + q] = key_states
        self.values[:n, :, self.length : self.length + q] = value_states
        self.length += q
        lo = self.shared
        return self.keys[:n, :, lo : self.length], self.values[:n, :, lo : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        assert self.keys is not None and self.values is not None  # called after the prefill's update
        p = self.rows // repeats
        self.keys[:, :, : self.length] = self.keys[:p, :, : self.length].repeat_interleave(repeats, dim=0)
        self.values[:, :, : self.length] = self.values[:p, :, : self.length].repeat_interleave(repeats, dim=0)

    def keep_prefix(self, prompts: int) -> None:
        """Cascade: keep the prefilled prompts where they are, in rows ``0 .. prompts - 1`` (read once per prompt by
        :func:`_cascade`); from now on ``update`` returns each row's answer positions only and ``move_rows`` moves
        those (a prompt's row is also an answer's, whose own positions start after the prompt's)."""
        self.shared, self.prompts = self.length, prompts

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None  # called after the prefill's update
        return self.keys[: self.prompts, :, : self.shared], self.values[: self.prompts, :, : self.shared]

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        assert self.keys is not None and self.values is not None  # called after the prefill's update
        lo = self.shared
        self.keys[dst, :, lo : self.length] = self.keys[src, :, lo : self.length]
        self.values[dst, :, lo : self.length] = self.values[src, :, lo : self.length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SlabLayer compacts with move_rows")


class SlabCache(Cache):
    """A transformers ``Cache`` of :class:`SlabLayer` s (one per decoder layer)."""

    def __init__(self, num_layers: int, rows: int, capacity: int):
        super().__init__(layers=[SlabLayer(rows, capacity) for _ in range(num_layers)])

    def move_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        for layer in cast("list[SlabLayer]", self.layers):  # all SlabLayers, built in __init__
            layer.move_rows(dst, src)

    def keep_prefix(self, prompts: int) -> None:
        for layer in cast("list[SlabLayer]", self.layers):
            layer.keep_prefix(prompts)


def _compaction(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Slots to fill and the rows to fill them with so that the live rows are the first ``m``: each dead slot below
    ``m`` takes one live row from ``m`` on (the fewest rows moved)."""
    m = int(live.sum())
    dst = (~live[:m]).nonzero().squeeze(-1)
    src = live[m:].nonzero().squeeze(-1) + m
    return dst, src, m
