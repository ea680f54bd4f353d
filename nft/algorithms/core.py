"""Registry, group statistics, the single reduction ``agg_loss`` and the public ``policy_loss``.

Everything here is pure tensor code: no I/O, no model. Shapes: ``B`` rows (answers), ``T`` response tokens.

Micro-batch exactness. The loss of a mini-batch (one optimizer step) is

    L = (1 / N) * sum_{rows, tokens} per_token_loss * mask          (N: the reduction's normaliser)

where ``per_token_loss`` of a row depends only on that row and its group's statistics. So the loop computes the
group statistics and ``N`` once on the whole mini-batch with :func:`batch_context`, slices the per-row entries for
each micro-batch and passes them to :func:`policy_loss`; the micro-batch losses then *add up* to the mini-batch loss
(no extra division by the number of micro-batches, the bug of TRL #5619 / verl #5625).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)
#: default constant of ``token-sum`` (the official NFT code divides the token sum by 1000).
TOKEN_SUM_CONST = 1000.0


# ----------------------------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------------------------
def agg_normalizer(mask: torch.Tensor, mode: str, const: float | None = None) -> float:
    """The denominator ``N`` of :func:`agg_loss` for a whole (mini-)batch.

    - ``token-mean`` (DAPO): number of response tokens.
    - ``seq-mean-token-mean`` (GRPO): number of non-empty rows (rows of padding do not count).
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): non-empty rows x ``const`` (a constant max length; default ``T``).
    - ``token-sum`` (official NFT): ``const`` (default 1000), independent of the batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg: unknown reduction mode {mode!r}; expected one of {list(AGG_MODES)}")
    if mode == "token-mean":
        return float(mask.sum())
    if mode == "seq-mean-token-mean":
        return float((mask.sum(-1) > 0).sum())
    if mode == "seq-mean-token-sum-norm":
        length = float(mask.shape[-1] if const is None else const)
        return float((mask.sum(-1) > 0).sum()) * length
    return float(TOKEN_SUM_CONST if const is None else const)


def agg_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    normalizer: float | None = None,
    const: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar: ``sum(row_weight * loss * mask) / N``.

    ``seq-mean-token-mean`` first averages each row over its own tokens (a row's own count is local to the row, so
    micro-batches stay exact); the other modes sum tokens. ``N`` is ``normalizer`` when given (the whole mini-batch's
    value from :func:`agg_normalizer`), else computed from ``mask``. An empty mask gives an exact zero (with a
    gradient of zeros), never NaN.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg: unknown reduction mode {mode!r}; expected one of {list(AGG_MODES)}")
    masked = torch.where(mask > 0, per_token_loss * mask, torch.zeros_like(per_token_loss))
    if mode == "seq-mean-token-mean":
        total = (masked.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum()
    else:
        total = masked.sum()
    norm = agg_normalizer(mask, mode, const) if normalizer is None else float(normalizer)
    return total / (norm if norm > 0 else 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Group statistics and the DAPO batch helpers
# ----------------------------------------------------------------------------------------------------------------------
def group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, std: Literal["population", "unbiased"] = "population"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and std of the rewards of the row's group. ``[B]`` in, ``([B], [B])`` out.

    ``std="population"`` divides by n (the paper's theory: for 0/1 rewards sigma = sqrt(r(1-r)));
    ``"unbiased"`` by n - 1 (``torch.std``, as verl's GRPO). A group of one answer has std 0.
    """
    if std not in ("population", "unbiased"):
        raise ValueError(f"std: expected 'population' or 'unbiased', got {std!r}")
    rewards = rewards.to(torch.float64) if rewards.dtype == torch.float64 else rewards.float()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=rewards.dtype).scatter_add_(0, inv, torch.ones_like(rewards))
    total = torch.zeros(n_groups, dtype=rewards.dtype).scatter_add_(0, inv, rewards)
    mean = (total / count)[inv]
    sq = torch.zeros(n_groups, dtype=rewards.dtype).scatter_add_(0, inv, (rewards - mean) ** 2)
    denom = count if std == "population" else (count - 1).clamp_min(1.0)
    return mean, (sq / denom).sqrt()[inv]


BATCH_RULES = ("all", "dynamic", "positives")
"""Which sampled answers an algorithm trains on (its registered ``batch_rule``; ``train.batch_rule`` may override it):

- ``all``: every answer;
- ``dynamic``: DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2; the official NFT code too): answers of groups
  whose mean reward is strictly between 0 and 1 (a uniform group carries no signal);
- ``positives``: RFT's rejection-sampling rule: the correct answers only (they alone enter its loss and its
  normaliser)."""


def keep_rows(rule: str, rewards: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The batch rule ``rule`` (:data:`BATCH_RULES`) as a ``[B]`` bool mask of the answers to train on.

    The one implementation of the rules: the loop selects its training rows with it and :func:`policy_loss` masks
    the rows of a ``positives`` loss with it. A group is trained on when any of its rows is kept. ``group_ids`` is
    needed by ``dynamic`` only."""
    if rule not in BATCH_RULES:
        raise ValueError(f"batch_rule: expected one of {BATCH_RULES}, got {rule!r}")
    if rule == "all":
        return torch.ones(rewards.shape, dtype=torch.bool)
    if rule == "positives":
        return rewards > 0.5
    if group_ids is None:
        raise ValueError("batch_rule dynamic: group_ids are needed to find each answer's group")
    mean, _ = group_stats(rewards, group_ids)
    return (mean > 0) & (mean < 1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Eq. 13), added to the reward.

    0 for ``L <= max_len - buffer``; ``-penalty * (L - (max_len - buffer)) / buffer`` up to ``max_len``;
    ``-penalty`` beyond.
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0) / buffer
    return -penalty * over.clamp(max=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """One registered loss: its per-token function, its hyperparameter dataclass and its reduction rules."""

    name: str
    fn: Callable
    params: type
    batch_rule: str = "all"
    """the answers it trains on (:data:`BATCH_RULES`); ``positives`` also restricts its loss and normaliser."""
    doc: str = ""
    reference: bool = False
    """trains on the pool's worked solutions instead of its own samples (supervised control): there is no sampling
    policy, so the loop passes ``old_logp = 0`` and ``-log R`` is ``-log pi``, the cross-entropy."""


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, params: type, *, batch_rule: str = "all", reference: bool = False):
    """Decorator: register ``fn(log_ratio, mask, rewards, group_rate, group_std, p) -> (per_token, parts)``.

    ``batch_rule`` is the algorithm's rule for which sampled answers it trains on (the official code's), applied by
    :func:`keep_rows`: ``all``, ``dynamic`` (DAPO's dynamic sampling) or ``positives`` (RFT). ``reference``: the loss
    trains on reference solutions, not samples (:attr:`LossSpec.reference`)."""
    if batch_rule not in BATCH_RULES:
        raise ValueError(f"batch_rule: expected one of {BATCH_RULES}, got {batch_rule!r}")

    def deco(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        LOSSES[name] = LossSpec(name, fn, params, batch_rule, (fn.__doc__ or "").strip(), reference)
        return fn

    return deco


def get_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {sorted(LOSSES)}")
    return LOSSES[name]


def make_params(name: str, **overrides):
    """The loss's hyperparameter dataclass with ``overrides`` applied; unknown names raise, naming them."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.params)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"loss {name!r}: unknown hyperparameter(s) {unknown}; valid: {sorted(fields)}")
    return spec.params(**overrides)


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
def _check_inputs(name, logp, old_logp, mask, rewards, group_ids, binary: bool) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp: expected a [B, T] tensor, got shape {tuple(logp.shape)}")
    for label, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{label}: shape {tuple(t.shape)} differs from logp's {tuple(logp.shape)}")
    B = logp.shape[0]
    for label, t in (("rewards", rewards), ("group_ids", group_ids)):
        if t.shape != (B,):
            raise ValueError(f"{label}: expected shape ({B},), got {tuple(t.shape)}")
    if not torch.isfinite(mask).all() or ((mask < 0) | (mask > 1)).any():
        raise ValueError("mask: values must be finite and in [0, 1]")
    on = mask > 0
    for label, t in (("logp", logp), ("old_logp", old_logp)):
        if not torch.isfinite(t.detach()[on]).all():
            raise ValueError(f"{label}: NaN or inf on {int((~torch.isfinite(t.detach()[on])).sum())} response tokens")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: NaN or inf")
    if binary and not ((rewards == 0) | (rewards == 1)).all():
        raise ValueError(f"rewards: loss {name!r} needs rewards in {{0, 1}}, got {sorted(set(rewards.tolist()))[:5]}")


def _resolve(name: str, params, overrides: dict):
    """The loss's hyperparameters: ``params`` made once by the caller (:func:`make_params`), else from
    ``overrides``."""
    if params is None:
        return make_params(name, **overrides)
    if overrides:
        raise ValueError(f"loss {name!r}: pass either params or hyperparameter overrides, not both")
    return params


def batch_context(name: str, *, mask, rewards, group_ids, params=None, rule: str | None = None, **overrides) -> dict:
    """What the loop computes once per mini-batch and slices for its micro-batches.

    Returns ``{"group_rate": [B], "group_std": [B], "normalizer": float}``: the group mean reward of each row (r-hat,
    before any clipping), its group's reward std (population or unbiased per the loss's ``std`` option) and the
    reduction's normaliser for the whole mini-batch. Pass the row slices and the normaliser to :func:`policy_loss`.
    """
    p = _resolve(name, params, overrides)
    rate, sd = group_stats(rewards, group_ids, std=getattr(p, "std", "population"))
    return {
        "group_rate": rate,
        "group_std": sd,
        "normalizer": loss_normalizer(name, mask=mask, rewards=rewards, params=p, rule=rule),
    }


def batch_rule(name: str, override: str | None = "auto") -> str:
    """The batch rule a run of loss ``name`` trains by: ``train.batch_rule`` when set, else the loss's registered
    rule. The one place this is decided: the loop selects its rows and the loss masks them by the same answer."""
    if override in (None, "auto"):
        return get_spec(name).batch_rule
    if override not in BATCH_RULES:
        raise ValueError(f"train.batch_rule: expected auto or one of {BATCH_RULES}, got {override!r}")
    return override


def _rule_mask(rule: str, mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The response mask restricted to the rows a ``positives`` rule counts; other rules count every row given (the
    loop has already applied their group rule)."""
    if rule != "positives":
        return mask
    return mask * keep_rows("positives", rewards).to(mask.dtype)[:, None]


def loss_normalizer(name: str, *, mask, rewards, params=None, rule: str | None = None, **overrides) -> float:
    """The reduction's normaliser of loss ``name`` for a whole (mini-)batch (under the ``positives`` rule, RFT's,
    positive rows only). ``rule``: the run's batch rule (:func:`batch_rule`; default the loss's own)."""
    p = _resolve(name, params, overrides)
    eff_mask = _rule_mask(rule or get_spec(name).batch_rule, mask, rewards)
    return agg_normalizer(eff_mask, p.agg, p.agg_const)


def policy_loss(
    name: str,
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    group_rate: torch.Tensor | None = None,
    group_std: torch.Tensor | None = None,
    normalizer: float | None = None,
    params=None,
    rule: str | None = None,
    **overrides,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``name`` of a (micro-)batch and its metrics.

    Args:
        logp, old_logp, mask: ``[B, T]`` log-probs of the sampled tokens under the current / sampling policy and the
            response mask (1 on response tokens). Padded positions may hold anything, even NaN.
        rewards: ``[B]`` correctness in {0, 1} (GRPO-family losses also accept shaped float rewards).
        group_ids: ``[B]`` ints; answers to the same question share an id.
        group_rate, group_std, normalizer: optional whole-mini-batch values from :func:`batch_context` (row slices
            and the scalar). When omitted they are computed from the rows given, i.e. this batch is the whole batch.
        params: the loss's hyperparameters made once with :func:`make_params` (the loop), or
        rule: the run's batch rule (:func:`batch_rule`); default the loss's registered one.
        **overrides: the loss's hyperparameters by name (see ``LOSSES[name].params``).

    Returns:
        ``(loss, metrics)``: a scalar tensor and a dict of floats (ratio mean/max, clip fractions, positive and
        negative parts of the loss that add up to it, ...).
    """
    spec = get_spec(name)
    p = _resolve(name, params, overrides)
    _check_inputs(name, logp, old_logp, mask, rewards, group_ids, binary=getattr(p, "binary_rewards", False))
    if group_rate is None or group_std is None:
        rate, sd = group_stats(rewards, group_ids, std=getattr(p, "std", "population"))
        group_rate = rate if group_rate is None else group_rate
        group_std = sd if group_std is None else group_std
    dtype = logp.dtype
    mask = mask.to(dtype)
    mask = _rule_mask(rule or spec.batch_rule, mask, rewards)
    on = mask > 0
    # Padded positions can hold garbage (even NaN); zero them so that nothing leaks into values or gradients.
    zero = torch.zeros((), dtype=dtype)
    log_ratio = torch.where(on, logp - old_logp.detach(), zero)
    per_token, parts = spec.fn(log_ratio, mask, rewards.to(dtype), group_rate.to(dtype), group_std.to(dtype), p)
    if normalizer is None:
        normalizer = agg_normalizer(mask, p.agg, p.agg_const)
    loss = agg_loss(per_token, mask, p.agg, normalizer=normalizer, const=p.agg_const)
    metrics = _metrics(loss, per_token, mask, rewards.to(dtype), log_ratio, parts, p, normalizer)
    return loss, metrics


def _metrics(loss, per_token, mask, rewards, log_ratio, parts, p, normalizer) -> dict[str, float]:
    on = mask > 0
    n_tok = int(on.sum())
    ratio = torch.exp(log_ratio.detach().clamp(max=20.0))
    pos_rows = (rewards > 0.5)[:, None] & on
    with torch.no_grad():
        pos = agg_loss(
            per_token.detach(), mask * pos_rows.to(mask.dtype), p.agg, normalizer=normalizer, const=p.agg_const
        )
    m = {
        "loss": float(loss.detach()),
        "loss_pos": float(pos),
        "loss_neg": float(loss.detach() - pos),
        "ratio_mean": float(ratio[on].mean()) if n_tok else 1.0,
        "ratio_max": float(ratio[on].max()) if n_tok else 1.0,
        "tokens": float(n_tok),
    }
    for key, flag in parts.items():  # boolean [B, T] indicators -> fractions of the (sub)set of tokens they cover
        flag, among = flag if isinstance(flag, tuple) else (flag, on)
        among = among & on
        m[key] = float(flag[among].float().mean()) if bool(among.any()) else 0.0
    return m
