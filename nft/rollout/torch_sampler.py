"""A lean KV-cache sampler on plain torch/transformers (the CPU backend of the sampler protocol).

Why not ``generate``: each of its decoding steps runs logits processors, stopping criteria and cache bookkeeping
that cost more than a tiny model's forward pass, and its cache grows by concatenation (every step copies the whole
cache). Here each distinct prompt is prefilled once and its keys/values copied into a cache preallocated for the
K answers and the longest answer (:class:`SlabCache`); a decoding step writes one position in place, attends to a
view of the filled part, and takes one log-softmax and one Gumbel-max draw. Finished rows are dropped by moving the
last live rows into their slots (only those rows are copied), and the attention mask is built once, not per step.
Where the K answers would re-read long prompts (:data:`CASCADE_MIN_BYTES`), the prompts' keys and values stay once
per prompt and each step's attention is split into a prompt part and an answer part (:func:`_cascade`).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from ..modeling import model_device, stop_token_ids
from .base import Rollout


def _top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter on log-probs: keep the smallest set of tokens with mass >= top_p, renormalised."""
    if top_p >= 1.0:
        return logp
    sorted_lp, idx = logp.sort(dim=-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    drop = cum - sorted_lp.exp() >= top_p  # tokens after the mass is reached
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    out = torch.full_like(logp, float("-inf")).scatter(-1, idx, sorted_lp)
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


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


class TorchSampler:
    """Samples from a transformers causal LM on the trainer's own module (so weight updates are seen at once)."""

    def __init__(self, model, tokenizer, cascade: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cascade = cascade
        """decode with the prompts read once per prompt (:func:`_cascade`), where the prepared mask runs (sdpa and a
        :data:`DECODE_GQA` mode other than "transformers"): None decides per call by :data:`CASCADE_MIN_BYTES` (on
        CPU), True / False force it (tests, benchmarks)."""
        self.stop_ids = torch.tensor(stop_token_ids(tokenizer), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.stop_ids[0])

    def update_weights(self, weights) -> None:
        """A module: sample from it (the trainer's own, nothing copied). A state dict, or a callable returning one
        (the ZeRO-3 gather): load it into this sampler's module."""
        if isinstance(weights, torch.nn.Module):
            self.model = weights
            return
        sd = weights() if callable(weights) else weights
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if unexpected or missing:
            raise ValueError(f"sampler weights: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def shard(self, dist) -> tuple[int, int, bool]:
        """One share of the questions per process."""
        return dist.rank, dist.world, True

    def sleep(self) -> None:
        """Nothing to free: the sampler is the trainer's module (or a copy beside it)."""

    def sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0) -> Rollout:
        ro = self._sample(prompts, n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        assert ro.entropy is not None  # _sample always records it
        # inference-mode tensors cannot enter autograd later (the trainer indexes with them): return normal copies
        ro.response, ro.mask, ro.logprobs, ro.finished, ro.entropy = (
            ro.response.clone(),
            ro.mask.clone(),
            ro.logprobs.clone(),
            ro.finished.clone(),
            ro.entropy.clone(),
        )
        return ro

    def _use_cascade(self, model, prompts: int, n: int, prompt_len: int, dev) -> bool:
        if self.cascade is not None:
            return self.cascade
        if dev.type != "cpu":  # measured on CPU only
            return False
        return repeated_prompt_bytes(model, prompts, n, prompt_len) >= CASCADE_MIN_BYTES

    @torch.inference_mode()
    def _sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0) -> Rollout:
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 for sampling, got {temperature}")
        model = self.model
        was_training, attention = model.training, getattr(model.config, "_attn_implementation", None)
        model.eval()
        try:
            enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            P, B = len(enc), len(enc) * n
            Lp = max(len(e) for e in enc)
            dev = model_device(model)
            ids = torch.full((P, Lp), self.pad_id, dtype=torch.long)
            attn = torch.zeros((P, Lp), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, Lp - len(e) :] = torch.tensor(e)
                attn[i, Lp - len(e) :] = 1
            ids, attn = ids.to(dev), attn.to(dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            cap = -(-(Lp + max_new_tokens) // 16) * 16  # rows of the mask aligned for fused GPU attention kernels
            cache = SlabCache(model.config.get_text_config(decoder=True).num_hidden_layers, B, cap)
            out = model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            prepared = attention == "sdpa" and DECODE_GQA.get(dev.type) != "transformers"
            cascade = prepared and n > 1 and self._use_cascade(model, P, n, Lp, dev)
            if cascade:
                cache.keep_prefix(P)
                dtype = next(model.parameters()).dtype
                prompt_bias = torch.zeros((P, Lp), dtype=dtype, device=dev).masked_fill_(
                    ~attn.bool(), torch.finfo(dtype).min
                )
            elif n > 1:
                cache.batch_repeat_interleave(n)
            logits = out.logits[:, -1, :].float().repeat_interleave(n, dim=0)
            # the key mask of every row over every position it can reach: the prompt's padding, then its answer
            keymask = torch.ones((B, cap), dtype=torch.bool, device=dev)
            keymask[:, :Lp] = attn.repeat_interleave(n, dim=0).bool()
            # with sdpa, each step's attention takes an additive (rows, 1, 1, keys) view of one buffer built here (a
            # float mask runs faster than a boolean one on CPU), not a mask built by transformers per step
            if prepared and not cascade:
                dtype = next(model.parameters()).dtype
                bias = torch.zeros(keymask.shape, dtype=dtype, device=dev).masked_fill_(
                    ~keymask, torch.finfo(dtype).min
                )
                bias4 = bias[:, None, None, :]
            next_pos = pos[:, -1:].repeat_interleave(n, dim=0) + 1

            gen = torch.Generator(device=dev).manual_seed(int(seed))
            stop_ids = self.stop_ids.to(dev)
            tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
            logps = torch.zeros((B, max_new_tokens), device=dev)
            ents = torch.zeros((B, max_new_tokens), device=dev)
            lengths = torch.zeros(B, dtype=torch.long, device=dev)
            finished = torch.zeros(B, dtype=torch.bool, device=dev)
            alive = torch.arange(B, device=dev)  # the answer each slot of the batch holds
            live = torch.ones(B, dtype=torch.bool, device=dev)  # slots still generating
            rank = None  # each slot's place in answer order, once compaction has permuted them
            for t in range(max_new_tokens):
                logp = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
                draw = _top_p_filter(logp, top_p) if top_p < 1.0 else logp
                # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p (cheaper than multinomial on CPU); the
                # noise rows follow answer order, so the draws do not depend on where compaction put each answer
                u = torch.rand(draw.shape, generator=gen, device=dev)
                if rank is not None:
                    u = u[rank]
                noise = -torch.log(-torch.log(u.clamp_(min=1e-20)))
                tok = (draw + noise).argmax(-1)
                rows = alive[live]
                tokens[rows, t] = tok[live]
                logps[rows, t] = draw.gather(-1, tok[:, None]).squeeze(-1)[live]
                ents[rows, t] = torch.special.entr(draw.exp()).sum(-1)[live]  # of the distribution drawn from
                lengths[rows] = t + 1
                stop = torch.isin(tok, stop_ids) & live
                finished[alive[stop]] = True
                live &= ~stop
                if t + 1 == max_new_tokens or not bool(live.any()):
                    break
                # drop finished rows once they are a quarter of the batch (in between they ride along and their
                # tokens are ignored): the last live rows move into their slots, the batch is its first m slots
                if int((~live).sum()) * 4 >= len(live):
                    dst, src, m = _compaction(live)
                    cache.move_rows(dst, src)
                    for a in (alive, tok, next_pos):
                        a[dst] = a[src]
                    if not prepared:  # the mask each step takes: transformers' boolean one, or the bias
                        keymask[dst] = keymask[src]
                    elif not cascade:
                        bias[dst] = bias[src]
                    alive, tok, next_pos = alive[:m], tok[:m], next_pos[:m]
                    live = torch.ones(m, dtype=torch.bool, device=dev)
                    rank = alive.argsort().argsort()
                L = Lp + t + 1
                # this step's attention mask: a SharedPrefix or the bias view (for DECODE_ATTENTION), or a key mask
                step_mask: dict[str, SharedPrefix | torch.Tensor] | torch.Tensor
                if cascade:
                    model.config._attn_implementation = DECODE_ATTENTION
                    step_mask = {"full_attention": SharedPrefix(cache, alive, n, prompt_bias, rank is not None)}
                elif prepared:
                    model.config._attn_implementation = DECODE_ATTENTION
                    step_mask = {"full_attention": bias4[: len(live), :, :, :L]}
                else:
                    step_mask = keymask[: len(live), :L]
                out = model(
                    input_ids=tok[:, None],
                    attention_mask=step_mask,
                    position_ids=next_pos,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits = out.logits[:, -1, :].float()
                next_pos = next_pos + 1
        finally:
            model.train(was_training)
            if attention is not None:
                model.config._attn_implementation = attention
        tokens, logps, lengths, finished = tokens.cpu(), logps.float().cpu(), lengths.cpu(), finished.cpu()
        ents = ents.float().cpu()
        T = max(int(lengths.max()), 1)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
        response = tokens[:, :T].masked_fill(mask == 0, self.pad_id)
        texts = self.tokenizer.batch_decode(
            [response[i, : lengths[i]].tolist() for i in range(B)], skip_special_tokens=True
        )
        return Rollout(
            prompt_ids=[e for e in enc for _ in range(n)],
            response=response,
            mask=mask,
            logprobs=logps[:, :T] * mask,
            finished=finished,
            texts=texts,
            entropy=ents[:, :T] * mask,
        )
