"""Log-probs and entropy of chosen tokens over a large vocabulary in bounded memory (a selective log-softmax).

The trainer needs, per answer token, ``log softmax(h W^T / temperature)[target]`` and the entropy of that
distribution. Materialised at once, the fp32 logits of 4,096 tokens over Qwen2.5's 151,936-word vocabulary are
2.49 GB, and autograd keeps several such tensors alive. :class:`ChunkedHead` computes them ``chunk`` rows at a time,
forward and backward: backward recomputes each chunk's logits from the saved hidden states and adds the head's
weight gradient into one buffer (``addmm_``), so the pass holds one weight gradient and one or two
``[chunk, vocab]`` fp32 tensors, whatever the number of tokens.

The head is called as a module (:func:`chunked_logprobs`), so that a DeepSpeed ZeRO-3 engine's hooks gather its
weight for the forward and again for the backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_chunk(tokens: int, vocab: int, budget_mb: float) -> int:
    """Tokens per chunk of a log-prob pass: 0 (one pass over all ``tokens``) when their fp32 logits fit in
    ``budget_mb``, else as many tokens as fit (at least one). ``budget_mb`` 0: never chunked."""
    budget = int(budget_mb * 2**20)
    if not budget or tokens * vocab * 4 <= budget:
        return 0
    return max(1, budget // (vocab * 4))


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.linear(h, weight).float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


class ChunkedHead(torch.autograd.Function):
    """``(log-probs [n], entropy [n])`` of ``targets`` under ``softmax(h @ weight.T / temperature)``, ``chunk`` rows of
    ``h`` ``[n, H]`` at a time. Gradients flow to ``h`` and ``weight`` through the log-probs; the entropy is a
    statistic (no gradient), as in the one-pass path."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature: float, chunk: int):
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        entropy = torch.empty_like(logp)
        for s in range(0, n, chunk):
            logp_all = F.log_softmax(_logits(h[s : s + chunk], weight, temperature), dim=-1)
            logp[s : s + chunk] = logp_all.gather(-1, targets[s : s + chunk].unsqueeze(-1)).squeeze(-1)
            entropy[s : s + chunk] = -(logp_all.exp().mul_(logp_all)).sum(-1)
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        h, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, g = h[s : s + ctx.chunk], grad_logp[s : s + ctx.chunk].float()
            # d logp_t / d z = onehot(t) - softmax(z), times 1/temperature for the logits' division
            dz = F.softmax(_logits(hc, weight, ctx.temperature), dim=-1)
            dz.mul_(-g.unsqueeze(-1)).scatter_add_(-1, targets[s : s + ctx.chunk].unsqueeze(-1), g.unsqueeze(-1))
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                torch.mm(dz, weight, out=grad_h[s : s + ctx.chunk])
            if grad_w is not None:
                grad_w.addmm_(dz.t(), hc)
        return grad_h, grad_w, None, None, None


def chunked_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int
):
    """Log-probs and entropies ``[B, T]`` of ``targets`` under the linear ``head`` applied to ``hidden`` ``[B, T, H]``,
    ``chunk`` tokens at a time (:class:`ChunkedHead`). The head module is called (its forward replaced for the call),
    so hooks on it run as for its own forward: ZeRO-3 gathers the weight, and gathers it again before the backward."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("chunked log-probs: the output head has a bias; set train.logprob_chunk_mb: 0")
    B, T, H = hidden.shape

    def forward(h, t):
        return ChunkedHead.apply(h, head.weight, t, temperature, chunk)

    head.forward = forward  # type: ignore[method-assign]
    try:
        logp, entropy = head(hidden.reshape(B * T, H), targets.reshape(B * T))
    finally:
        del head.forward
    return logp.reshape(B, T), entropy.reshape(B, T)
