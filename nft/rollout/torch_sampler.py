"""A lean KV-cache sampler on plain torch/transformers (the CPU backend of the sampler protocol).

Why not ``generate``: each of its decoding steps runs logits processors, stopping criteria and cache bookkeeping
that cost more than a tiny model's forward pass. Here a step is one forward of the new tokens, one log-softmax and
one ``multinomial``. Each distinct prompt is prefilled once and its KV cache repeated n times (the K answers to a
question share the prompt), and rows that have finished are dropped from the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class TorchSampler:
    """Samples from a transformers causal LM on the trainer's own module (so weight updates are seen at once)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
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
        # inference-mode tensors cannot enter autograd later (the trainer indexes with them): return normal copies
        ro.response, ro.mask, ro.logprobs, ro.finished, ro.entropy = (
            ro.response.clone(), ro.mask.clone(), ro.logprobs.clone(), ro.finished.clone(), ro.entropy.clone())
        return ro

    @torch.inference_mode()
    def _sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0) -> Rollout:
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 for sampling, got {temperature}")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
            P, B = len(enc), len(enc) * n
            Lp = max(len(e) for e in enc)
            dev = model_device(model)
            ids = torch.full((P, Lp), self.pad_id, dtype=torch.long)
            attn = torch.zeros((P, Lp), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, Lp - len(e):] = torch.tensor(e)
                attn[i, Lp - len(e):] = 1
            ids, attn = ids.to(dev), attn.to(dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if n > 1:
                cache.batch_repeat_interleave(n)
            logits = out.logits[:, -1, :].float().repeat_interleave(n, dim=0)
            attn = attn.repeat_interleave(n, dim=0)
            next_pos = pos[:, -1:].repeat_interleave(n, dim=0) + 1

            gen = torch.Generator(device=dev).manual_seed(int(seed))
            stop_ids = self.stop_ids.to(dev)
            tokens = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
            logps = torch.zeros((B, max_new_tokens), device=dev)
            ents = torch.zeros((B, max_new_tokens), device=dev)
            lengths = torch.zeros(B, dtype=torch.long, device=dev)
            finished = torch.zeros(B, dtype=torch.bool, device=dev)
            alive = torch.arange(B, device=dev)  # rows in the batch, in cache order
            live = torch.ones(B, dtype=torch.bool, device=dev)  # rows of the batch still generating
            for t in range(max_new_tokens):
                logp = F.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
                draw = _top_p_filter(logp, top_p) if top_p < 1.0 else logp
                # Gumbel-max: argmax(log p + Gumbel noise) is a draw from p (cheaper than multinomial on CPU)
                noise = -torch.log(-torch.log(torch.rand(draw.shape, generator=gen, device=dev).clamp_(min=1e-20)))
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
                # drop finished rows from the batch and its cache once they are a quarter of it (each compaction
                # copies the whole cache; in between they ride along and their tokens are ignored)
                if int((~live).sum()) * 4 >= len(live):
                    keep = live.nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    alive, tok, attn, next_pos, live = alive[keep], tok[keep], attn[keep], next_pos[keep], live[keep]
                attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=dev)], dim=-1)
                out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos,
                            past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :].float()
                next_pos = next_pos + 1
        finally:
            model.train(was_training)
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

