"""The per-token policy losses (five online algorithms and a supervised control), registered by name.

Every function has the signature ``fn(log_ratio, mask, rewards, group_rate, group_std, p) -> (per_token, parts)``:

- ``log_ratio`` ``[B, T]``: log pi_theta(a_t) - log pi_old(a_t), zero on padding (gradient flows through pi_theta);
- ``mask`` ``[B, T]``; ``rewards`` ``[B]``; ``group_rate`` ``[B]`` the group mean reward r-hat of each row;
  ``group_std`` ``[B]`` the group reward std; ``p`` the loss's hyperparameter dataclass;
- ``per_token`` ``[B, T]`` the loss before :func:`nft.algorithms.core.agg_loss` (with ``p.agg``) reduces it;
- ``parts`` named boolean ``[B, T]`` indicators (or ``(flag, among)`` pairs) reported as token fractions.

Callers use :func:`nft.algorithms.policy_loss`; the functions are registered here and never called by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .core import AGG_MODES, register_loss


def _check(p) -> None:
    if p.agg not in AGG_MODES:
        raise ValueError(f"agg: unknown reduction mode {p.agg!r}; expected one of {list(AGG_MODES)}")
    if p.agg_const is not None and p.agg_const <= 0:
        raise ValueError(f"agg_const: must be > 0, got {p.agg_const}")


# ----------------------------------------------------------------------------------------------------------------------
# NFT and RFT
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NFTParams:
    """Hyperparameters of NFT (Chen et al. 2026, "Bridging Supervised Learning and RL in Math Reasoning", Eq. 8/9)."""

    eps: float = 1.0
    """epsilon of max_v: the negative term's value is clipped below at eps, its gradient passes (1/max(x, eps))."""
    omega: Literal["one", "one_minus_r", "sqrt"] = "one_minus_r"
    """per-question weight omega(q): 1, 1 - r-hat (paper default), or sqrt((1 - r-hat) / r-hat) (GRPO-equivalent)."""
    neg_weight: float = 1.0
    """scales the negative term (0 gives RFT with NFT's weighting)."""
    ratio: Literal["token", "sequence"] = "token"
    """'token': R_t per token. 'sequence': R = exp(min(sum_t log R_t, log_ratio_max)) per answer, its loss spread
    evenly over the answer's tokens (so every reduction mode treats it like a token loss), as the official code's
    ``ratio_type=sequence``."""
    rate_min: float = 0.02
    """r-hat is clipped to [rate_min, rate_max] (official code: 0.02, 0.98)."""
    rate_max: float = 0.98
    log_ratio_max: float = 10.0
    """R_t = exp(min(log R_t, log_ratio_max)) (official code: 10)."""
    agg: str = "token-sum"
    """reduction (official code: token sum / 1000)."""
    agg_const: float | None = None
    """constant of 'token-sum' (default 1000) or 'seq-mean-token-sum-norm' (default T)."""
    binary_rewards: bool = True

    def __post_init__(self):
        _check(self)
        if self.omega not in ("one", "one_minus_r", "sqrt"):
            raise ValueError(f"omega: expected 'one', 'one_minus_r' or 'sqrt', got {self.omega!r}")
        if self.ratio not in ("token", "sequence"):
            raise ValueError(f"ratio: expected 'token' or 'sequence', got {self.ratio!r}")
        if not self.eps > 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if not 0 < self.rate_min <= self.rate_max < 1:
            raise ValueError(
                f"rate_min/rate_max: need 0 < rate_min <= rate_max < 1, got {self.rate_min}, {self.rate_max}"
            )


@dataclass(frozen=True)
class RFTParams:
    """Rejection-sampling fine-tuning (the paper's RFT baseline): NFT's positive term alone, omega = 1."""

    log_ratio_max: float = 10.0
    agg: str = "token-sum"
    agg_const: float | None = None
    binary_rewards: bool = True

    def __post_init__(self):
        _check(self)


def _omega(rate: torch.Tensor, omega: str) -> torch.Tensor:
    if omega == "one":
        return torch.ones_like(rate)
    if omega == "one_minus_r":
        return 1.0 - rate
    return ((1.0 - rate) / rate).sqrt()


def _ratio_terms(log_ratio, mask, p):
    """(log R clipped at log_ratio_max, per-token spreading weight) for token- or sequence-level ratios."""
    if getattr(p, "ratio", "token") == "token":
        return log_ratio.clamp(max=p.log_ratio_max), torch.ones_like(log_ratio)
    n = mask.sum(-1, keepdim=True).clamp_min(1.0)
    seq = (log_ratio * mask).sum(-1, keepdim=True).clamp(max=p.log_ratio_max)
    return seq.expand_as(log_ratio), (1.0 / n).expand_as(log_ratio)


@register_loss("nft", NFTParams, batch_rule="dynamic")
def nft_loss(log_ratio, mask, rewards, group_rate, group_std, p: NFTParams):
    """Negative-aware Fine-Tuning, per token t of answer a to question q (paper Eq. 9, official ``dp_actor.py``):

        L_t = -omega(q) * [ r * log R_t + neg_weight * (1 - r) * log max_v((1 - r_q R_t) / (1 - r_q), eps) ]

    with R_t = exp(min(log pi/pi_old, 10)), r_q the group correct rate clipped to [0.02, 0.98], and
    max_v(x, eps) = x + stopgrad(max(x, eps) - x): the value is clipped at eps, the gradient is 1/max(x, eps) dx.
    With R = 1: grad L_t = -omega / (1 - r_q) * (r - r_q) grad log pi, i.e. GRPO's gradient for
    omega = sqrt((1 - r_q)/r_q) and Dr.GRPO's for omega = 1 - r_q (Proposition 4.2).
    """
    rate = group_rate.clamp(p.rate_min, p.rate_max)[:, None]
    lr, spread = _ratio_terms(log_ratio, mask, p)
    ratio = torch.exp(lr)
    x = (1.0 - rate * ratio) / (1.0 - rate)
    y = x + (x.clamp(min=p.eps) - x).detach()
    r = rewards[:, None]
    pos = -lr
    neg = -torch.log(y)
    per_token = _omega(rate, p.omega) * spread * (r * pos + (1.0 - r) * p.neg_weight * neg)
    negative = (r < 0.5).expand_as(x)
    return per_token, {"neg_eps_clip_frac": ((x < p.eps) & negative, negative)}


@register_loss("rft", RFTParams, batch_rule="positives")
def rft_loss(log_ratio, mask, rewards, group_rate, group_std, p: RFTParams):
    """Rejection-sampling fine-tuning: L_t = -log R_t on the positive answers only (negatives are masked out of the
    loss and of its normaliser). With R = 1 its gradient is the SFT gradient -grad log pi on the positives.
    """
    lr = log_ratio.clamp(max=p.log_ratio_max)
    return -lr * rewards[:, None], {}


@dataclass(frozen=True)
class SFTParams:
    """Supervised fine-tuning on the training pool's worked solutions (the equal-compute control, not in the paper)."""

    agg: str = "token-mean"
    """cross-entropy averaged over the mini-batch's reference tokens."""
    agg_const: float | None = None

    def __post_init__(self):
        _check(self)


@register_loss("sft", SFTParams, reference=True)
def sft_loss(log_ratio, mask, rewards, group_rate, group_std, p: SFTParams):
    """Supervised control: L_t = -log pi(a_t) on reference solutions (the loop passes old log-probs of 0, so
    ``log_ratio`` is log pi): the token-mean cross-entropy on the reference tokens. Its rows are the pool's worked
    solutions (``LossSpec.reference``), as many per optimizer step as an online run's answers."""
    return -log_ratio, {}


# ----------------------------------------------------------------------------------------------------------------------
# GRPO family: clipped surrogate with group-relative advantages
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GRPOParams:
    """GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3 without KL) as run by verl: std-normalised group advantage."""

    clip_low: float = 0.2
    """epsilon_low: the ratio is clipped to [1 - clip_low, 1 + clip_high]."""
    clip_high: float = 0.2
    std: Literal["population", "unbiased"] = "unbiased"
    """group std: 'unbiased' (n - 1, torch.std, verl's default) or 'population' (n, what Prop. 4.2 assumes)."""
    std_eps: float = 1e-6
    """A = (r - mean) / (std + std_eps)."""
    log_ratio_max: float = 20.0
    """log R is clamped to [-log_ratio_max, log_ratio_max] before exp (verl: 20)."""
    agg: str = "seq-mean-token-mean"
    agg_const: float | None = None
    normalize_std: bool = True
    """False gives Dr.GRPO's advantage r - mean."""

    def __post_init__(self):
        _check(self)
        if self.std not in ("population", "unbiased"):
            raise ValueError(f"std: expected 'population' or 'unbiased', got {self.std!r}")
        if self.clip_low < 0 or self.clip_high < 0 or self.clip_low >= 1:
            raise ValueError(
                f"clip_low/clip_high: need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}"
            )


@dataclass(frozen=True)
class DrGRPOParams(GRPOParams):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A = r - mean, sum over tokens / max length."""

    normalize_std: bool = False
    agg: str = "seq-mean-token-sum-norm"


@dataclass(frozen=True)
class DAPOParams(GRPOParams):
    """DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28) and token-level mean; dynamic sampling and the overlong
    penalty are batch rules applied by the loop (``keep_rows``, ``overlong_penalty``)."""

    clip_high: float = 0.28
    agg: str = "token-mean"


def _clipped_surrogate(log_ratio, rewards, group_rate, group_std, p: GRPOParams):
    adv = rewards - group_rate
    if p.normalize_std:
        adv = adv / (group_std + p.std_eps)
    adv = adv[:, None]
    ratio = torch.exp(log_ratio.clamp(-p.log_ratio_max, p.log_ratio_max))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - p.clip_low, 1.0 + p.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    parts = {
        "clip_frac_low": (ratio < 1.0 - p.clip_low) & (adv < 0),
        "clip_frac_high": (ratio > 1.0 + p.clip_high) & (adv > 0),
    }
    return per_token, parts


@register_loss("grpo", GRPOParams)
def grpo_loss(log_ratio, mask, rewards, group_rate, group_std, p: GRPOParams):
    """GRPO: A = (r - mean_q) / (std_q + 1e-6), L_t = max(-A R_t, -A clip(R_t, 1 - eps_low, 1 + eps_high)),
    reduced with ``seq-mean-token-mean`` (Shao et al. 2024; verl ``compute_policy_loss``)."""
    return _clipped_surrogate(log_ratio, rewards, group_rate, group_std, p)


@register_loss("dr_grpo", DrGRPOParams)
def dr_grpo_loss(log_ratio, mask, rewards, group_rate, group_std, p: DrGRPOParams):
    """Dr.GRPO: A = r - mean_q (no std), same clipped surrogate, reduced with ``seq-mean-token-sum-norm``
    (sum over tokens divided by a constant max length, mean over answers; Liu et al. 2025)."""
    return _clipped_surrogate(log_ratio, rewards, group_rate, group_std, p)


@register_loss("dapo", DAPOParams, batch_rule="dynamic")
def dapo_loss(log_ratio, mask, rewards, group_rate, group_std, p: DAPOParams):
    """DAPO: GRPO's advantage with clip-higher (eps_low 0.2, eps_high 0.28) and the ``token-mean`` reduction over
    all tokens of the mini-batch (Yu et al. 2025, Eq. 8)."""
    return _clipped_surrogate(log_ratio, rewards, group_rate, group_std, p)
