"""A lean KV-cache sampler on plain torch/transformers (the CPU backend of the sampler protocol).

Why not ``generate``: each of its decoding steps runs logits processors, stopping criteria and cache bookkeeping
that cost more than a tiny model's forward pass, and its cache grows by concatenation (every step copies the whole
cache). Here each distinct prompt is prefilled once and its keys/values copied into a cache preallocated for the
K answers and the longest answer (:class:`SlabCache`); a decoding step writes one position in place, attends to a
view of the filled part, and takes one log-softmax and one Gumbel-max draw. Finished rows are dropped by moving the
last live rows into their slots (only those rows are copied), and the attention mask is built once, not per step.
Where the K answers would re-read long prompts (:data:`CASCADE_MIN_BYTES`), the prompts' keys and values stay once
per prompt and each step's attention is split into a prompt part and an answer part (:func:`_cascade`). The cache and
the attention are :mod:`nft.rollout.kv_cache`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling import model_device, stop_token_ids
from . import kv_cache
from .base import Rollout, concat_rollouts
from .chunks import answer_uniforms, prompts_per_chunk
from .kv_cache import DECODE_ATTENTION, DECODE_GQA, SharedPrefix, SlabCache, _compaction, repeated_prompt_bytes


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


@dataclass
class _Batch:
    """What one sampling call carries from step to step. Slot ``i`` of the batch holds answer ``alive[i]``; the batch
    is its first ``len(live)`` slots, and ``live`` marks those still generating."""

    cache: SlabCache
    dev: torch.device
    n: int
    """answers per prompt"""
    prompt_len: int
    """the prompts' length, left-padded to the longest"""
    prepared: bool
    """each step's attention takes a mask prepared here (sdpa through :data:`DECODE_ATTENTION`)"""
    cascade: bool
    """... split into the prompts' part, read once per prompt, and the answers' part (:func:`_cascade`)"""
    keymask: torch.Tensor
    """``(B, capacity)`` bool: the key positions every row can attend to (its prompt's padding, then its answer)"""
    bias: torch.Tensor | None
    """``keymask`` as an additive float mask (prepared, not cascade), and its ``(B, 1, 1, capacity)`` view"""
    bias4: torch.Tensor | None
    prompt_bias: torch.Tensor | None
    """the prompts' additive padding mask ``(P, prompt_len)`` (cascade)"""
    next_pos: torch.Tensor
    """each slot's next position id"""
    alive: torch.Tensor
    live: torch.Tensor
    rank: torch.Tensor | None = None
    """each slot's place in answer order, once compaction has permuted them"""

    def compact(self, tok: torch.Tensor) -> torch.Tensor:
        """Drop the finished rows: the last live rows move into their slots and the batch becomes its first ``m``
        slots (the cache, the answer each slot holds, its next token and position, and the mask the steps take).
        Returns the next tokens of the compacted batch."""
        dst, src, m = _compaction(self.live)
        self.cache.move_rows(dst, src)
        for a in (self.alive, tok, self.next_pos):
            a[dst] = a[src]
        if not self.prepared:  # the mask each step takes: transformers' boolean one, or the bias
            self.keymask[dst] = self.keymask[src]
        elif not self.cascade:
            assert self.bias is not None  # prepared without cascade: built by the prefill
            self.bias[dst] = self.bias[src]
        self.alive, tok, self.next_pos = self.alive[:m], tok[:m], self.next_pos[:m]
        self.live = torch.ones(m, dtype=torch.bool, device=self.dev)
        self.rank = self.alive.argsort().argsort()
        return tok


@dataclass
class _Answers:
    """What was drawn, by answer (row ``prompt * n + j``) and step: tokens, their log-probs, the entropy of the
    distribution each was drawn from, each answer's length and whether it ended with a stop token."""

    tokens: torch.Tensor
    logps: torch.Tensor
    ents: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor

    @classmethod
    def empty(cls, rows: int, steps: int, pad_id: int, dev: torch.device) -> _Answers:
        return cls(
            tokens=torch.full((rows, steps), pad_id, dtype=torch.long, device=dev),
            logps=torch.zeros((rows, steps), device=dev),
            ents=torch.zeros((rows, steps), device=dev),
            lengths=torch.zeros(rows, dtype=torch.long, device=dev),
            finished=torch.zeros(rows, dtype=torch.bool, device=dev),
        )


def _draw(logits, b: _Batch, out: _Answers, t: int, rng, temperature, top_p, stop_ids) -> torch.Tensor:
    """Step ``t``'s token of every slot, recorded for the live ones (a stop token ends its answer); returns them.
    ``rng``: the call's generator, or ``(seed, first answer)``: a random stream per answer (:mod:`.chunks`)."""
    logp = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    draw = _top_p_filter(logp, top_p) if top_p < 1.0 else logp
    # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p (cheaper than multinomial on CPU); the noise rows
    # follow answer order, so the draws do not depend on where compaction put each answer
    if isinstance(rng, torch.Generator):
        u = torch.rand(draw.shape, generator=rng, device=b.dev)
        if b.rank is not None:
            u = u[b.rank]
    else:
        u = answer_uniforms(rng[0], rng[1] + b.alive, t, draw.shape[-1])
    noise = -torch.log(-torch.log(u.clamp_(min=1e-20)))
    tok = (draw + noise).argmax(-1)
    rows = b.alive[b.live]
    out.tokens[rows, t] = tok[b.live]
    out.logps[rows, t] = draw.gather(-1, tok[:, None]).squeeze(-1)[b.live]
    out.ents[rows, t] = torch.special.entr(draw.exp()).sum(-1)[b.live]  # of the distribution drawn from
    out.lengths[rows] = t + 1
    stop = torch.isin(tok, stop_ids) & b.live
    out.finished[b.alive[stop]] = True
    b.live &= ~stop
    return tok


class TorchSampler:
    """Samples from a transformers causal LM on the trainer's own module (so weight updates are seen at once)."""

    seeds_per_prompt = False

    def __init__(self, model, tokenizer, cascade: bool | None = None, memory_mb: float = 0, stops: str = "chat"):
        self.model = model
        self.tokenizer = tokenizer
        self.memory_mb = memory_mb
        """a call's decoding memory budget (0: one block, one random stream per call)"""
        self.cascade = cascade
        """decode with the prompts read once per prompt (:func:`_cascade`), where the prepared mask runs (sdpa and a
        :data:`DECODE_GQA` mode other than "transformers"): None decides per call by :data:`CASCADE_MIN_BYTES` (on
        CPU), True / False force it (tests, benchmarks)."""
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stop_ids = torch.tensor(stop_token_ids(tokenizer, stops, generation_eos), dtype=torch.long)
        """where an answer ends (``stops``: :func:`nft.modeling.stop_token_ids`)"""
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(self.stop_ids[0])

    def update_weights(self, weights) -> None:
        """A module: sample from it (the trainer's own, nothing copied). A state dict, or a callable returning
        ``(name, tensor)`` pairs (the ZeRO-3 gather, bucket by bucket): copied into this sampler's module pair by
        pair, so nothing beyond the pair in hand is held."""
        if isinstance(weights, torch.nn.Module):
            self.model = weights
            return
        pairs = weights() if callable(weights) else weights.items()
        own = dict(self.model.named_parameters(remove_duplicate=False))
        own.update((k, b) for k, b in self.model.named_buffers() if k in self.model.state_dict())
        loaded: set[int] = set()
        unexpected = []
        with torch.no_grad():
            for name, t in pairs:
                if name not in own:
                    unexpected.append(name)
                    continue
                own[name].copy_(t)
                loaded.add(id(own[name]))
        missing = [k for k, v in own.items() if id(v) not in loaded]  # a tied name counts as loaded by its twin
        if unexpected or missing:
            raise ValueError(f"sampler weights: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def shard(self, dist) -> tuple[int, int, bool]:
        """One share of the questions per process."""
        return dist.rank, dist.world, True

    def sleep(self) -> None:
        """Nothing to free: the sampler is the trainer's module (or a copy beside it)."""

    def sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0) -> Rollout:
        """``n`` answers per prompt. Within a memory budget (``memory_mb``) the prompts go in chunks sized from it,
        each answer drawing from its own random stream: the same tokens whatever the chunks (:mod:`.chunks`)."""
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if not self.memory_mb:
            ro = self._sample(prompts, n, **kw)
        else:
            longest = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
            dtype = next(self.model.parameters()).dtype
            per = prompts_per_chunk(self.model.config, n, longest, max_new_tokens, dtype, self.memory_mb)
            ro = concat_rollouts(
                [self._sample(prompts[i : i + per], n, **kw, first=i * n) for i in range(0, len(prompts), per)],
                self.pad_id,
            )
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
        # read from its module at each call: a benchmark or test that sets the threshold there is seen here
        return repeated_prompt_bytes(model, prompts, n, prompt_len) >= kv_cache.CASCADE_MIN_BYTES

    @torch.inference_mode()
    def _sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0, first=None) -> Rollout:
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 for sampling, got {temperature}")
        model = self.model
        was_training, attention = model.training, getattr(model.config, "_attn_implementation", None)
        model.eval()
        try:
            enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            b, logits = self._prefill(model, enc, n, max_new_tokens, attention)
            answers = self._decode(model, b, logits, max_new_tokens, temperature, top_p, seed, first)
        finally:
            model.train(was_training)
            if attention is not None:
                model.config._attn_implementation = attention
        return self._rollout(enc, n, answers)

    def _prefill(
        self, model, enc: list[list[int]], n: int, max_new_tokens: int, attention
    ) -> tuple[_Batch, torch.Tensor]:
        """Run the prompts (left-padded) once into a cache with room for their ``n`` answers each and the longest
        answer; build the masks the decoding steps take. Returns the batch and the first step's logits per answer."""
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
        prompt_bias = bias = bias4 = None
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
            bias = torch.zeros(keymask.shape, dtype=dtype, device=dev).masked_fill_(~keymask, torch.finfo(dtype).min)
            bias4 = bias[:, None, None, :]
        next_pos = pos[:, -1:].repeat_interleave(n, dim=0) + 1
        alive = torch.arange(B, device=dev)
        live = torch.ones(B, dtype=torch.bool, device=dev)
        batch = _Batch(cache, dev, n, Lp, prepared, cascade, keymask, bias, bias4, prompt_bias, next_pos, alive, live)
        return batch, logits

    def _decode(self, model, b: _Batch, logits, max_new_tokens: int, temperature, top_p, seed, first) -> _Answers:
        """Draw up to ``max_new_tokens`` tokens per answer, one decoding step at a time, until every answer stopped.
        ``first``: None, one random stream for the call; else the call's first answer's index in a chunked call
        (a stream per answer)."""
        gen = torch.Generator(device=b.dev).manual_seed(int(seed)) if first is None else (int(seed), first)
        stop_ids = self.stop_ids.to(b.dev)
        out = _Answers.empty(len(b.alive), max_new_tokens, self.pad_id, b.dev)
        for t in range(max_new_tokens):
            tok = _draw(logits, b, out, t, gen, temperature, top_p, stop_ids)
            if t + 1 == max_new_tokens or not bool(b.live.any()):
                break
            # drop finished rows once they are a quarter of the batch (in between they ride along and their tokens
            # are ignored)
            if int((~b.live).sum()) * 4 >= len(b.live):
                tok = b.compact(tok)
            logits = self._step(model, b, tok, b.prompt_len + t + 1)
        return out

    @staticmethod
    def _step(model, b: _Batch, tok: torch.Tensor, L: int) -> torch.Tensor:
        """One decoding step: the batch's tokens ``tok`` into the cache, attending to its first ``L`` positions;
        returns the next logits."""
        # this step's attention mask: a SharedPrefix or the bias view (for DECODE_ATTENTION), or a key mask
        step_mask: dict[str, SharedPrefix | torch.Tensor] | torch.Tensor
        if b.cascade:
            assert b.prompt_bias is not None  # built by the prefill for cascade
            model.config._attn_implementation = DECODE_ATTENTION
            step_mask = {"full_attention": SharedPrefix(b.cache, b.alive, b.n, b.prompt_bias, b.rank is not None)}
        elif b.prepared:
            assert b.bias4 is not None  # built by the prefill when prepared without cascade
            model.config._attn_implementation = DECODE_ATTENTION
            step_mask = {"full_attention": b.bias4[: len(b.live), :, :, :L]}
        else:
            step_mask = b.keymask[: len(b.live), :L]
        out = model(
            input_ids=tok[:, None],
            attention_mask=step_mask,
            position_ids=b.next_pos,
            past_key_values=b.cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :].float()
        b.next_pos = b.next_pos + 1
        return logits

    def _rollout(self, enc: list[list[int]], n: int, out: _Answers) -> Rollout:
        """The answers as a Rollout on the CPU: each response cut at its length and padded to the longest."""
        B = len(enc) * n
        tokens, logps, lengths = out.tokens.cpu(), out.logps.float().cpu(), out.lengths.cpu()
        finished, ents = out.finished.cpu(), out.ents.float().cpu()
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
