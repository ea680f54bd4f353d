"""Steps 2-3 of a rollout step: old log-probs, then one optimizer step per mini-batch of questions, each accumulated
over micro-batches (exact: ``nft.algorithms.core``).

Every rank holds the whole batch and trains on its share of each mini-batch (``nft.train.engines``); the normaliser
is the whole mini-batch's, so the shares' losses add up to the one-process loss. How each logged metric combines
over micro-batches and ranks is declared once, in :data:`REDUCTION`.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..algorithms import batch_context, get_spec, loss_normalizer, make_params, policy_loss
from ..dist import Dist
from ..modeling import response_logprobs
from .config import TrainConfig
from .engines import Engine
from .seeds import derive_seed

#: How each metric of ``policy_loss`` combines over the micro-batches of a step and over ranks, and its logged name.
#: ``sum``: the micro-batch losses add up to the mini-batch loss (logged as the mean over mini-batches); ``max``;
#: ``token_mean``: weighted by the micro-batch's response tokens. Metrics not listed are token means under
#: ``loss/<name>``.
REDUCTION: dict[str, tuple[str, str]] = {
    "loss": ("sum", "loss/total"),
    "loss_pos": ("sum", "loss/pos"),
    "loss_neg": ("sum", "loss/neg"),
    "ratio_max": ("max", "loss/ratio_max"),
}
#: metrics of ``policy_loss`` that are bookkeeping, not logged
NOT_LOGGED = {"tokens"}


def reduction(name: str) -> tuple[str, str]:
    return REDUCTION.get(name, ("token_mean", f"loss/{name}"))


@dataclass
class UpdateStats:
    """One rank's running sums over a step's micro-batches (exchanged between ranks by name, merged by rule)."""

    sums: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0
    entropy_sum: float = 0.0
    mismatch_sum: float = 0.0
    mismatch_count: int = 0
    mismatch_max: float = 0.0
    step_losses: list[float] = field(default_factory=list)

    def add_micro(self, met: dict[str, float], n_tok: float, entropy_sum: float) -> None:
        for k, v in met.items():
            if k in NOT_LOGGED:
                continue
            rule = reduction(k)[0]
            self._combine(k, v * n_tok if rule == "token_mean" else v)
        self.tokens += n_tok
        self.entropy_sum += entropy_sum

    def _combine(self, k: str, v: float) -> None:
        self.sums[k] = max(self.sums.get(k, 0.0), v) if reduction(k)[0] == "max" else self.sums.get(k, 0.0) + v

    @staticmethod
    def merge(parts: list["UpdateStats"]) -> "UpdateStats":
        out = UpdateStats()
        for p in parts:
            for k, v in p.sums.items():
                out._combine(k, v)
        out.tokens, out.entropy_sum = sum(p.tokens for p in parts), sum(p.entropy_sum for p in parts)
        out.mismatch_sum, out.mismatch_count = sum(p.mismatch_sum for p in parts), sum(p.mismatch_count for p in parts)
        out.mismatch_max = max(p.mismatch_max for p in parts)
        out.step_losses = [sum(x) for x in zip(*(p.step_losses for p in parts))]
        return out

    def metrics(self, n_mini: int) -> dict[str, float]:
        out = {}
        for k, v in self.sums.items():
            rule, name = reduction(k)
            out[name] = v / n_mini if rule == "sum" else v if rule == "max" else v / max(self.tokens, 1.0)
        return out


def _rows(batch: dict, idx: list[int]) -> dict:
    t = torch.tensor(idx, dtype=torch.long)
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[t]) for k, v in batch.items()}


def plan_minibatches(batch: dict, cfg: TrainConfig, seed: int, step: int, dist: Dist):
    """``(minis, plan)``: the mini-batches (row lists of whole questions, in a seeded order) and this rank's
    micro-batches of each (rows ``rank::world`` in chunks of ``micro_batch_size``; every rank gets the same number,
    empty lists where it ran out, so the collectives of a sharded model line up)."""
    groups = batch["group_ids"].unique().tolist()
    random.Random(derive_seed(seed, "minibatch", step)).shuffle(groups)
    n_mini = max(1, math.ceil(len(groups) / cfg.mini_batch_prompts))
    mini_of = {g: m for m in range(n_mini) for g in groups[m::n_mini]}
    minis: list[list[int]] = [[] for _ in range(n_mini)]
    for i, g in enumerate(batch["group_ids"].tolist()):
        minis[mini_of[g]].append(i)
    minis = [m for m in minis if m]
    mb = cfg.micro_batch_size
    plan = []
    for rows in minis:
        share = rows[dist.rank::dist.world]
        n = max(1, math.ceil(math.ceil(len(rows) / dist.world) / mb))
        plan.append([share[s * mb: (s + 1) * mb] for s in range(n)])
    return minis, plan


def _micro(batch: dict, rows: list[int], first: int) -> dict:
    """The rows, or (a rank with nothing left) one row of the mini-batch with an empty mask: it runs forward and
    backward like the others and adds nothing."""
    sub = _rows(batch, rows or [first])
    if not rows:
        sub["mask"] = torch.zeros_like(sub["mask"])
    return sub


def old_logprobs(model, batch: dict, minis, plan, cfg: TrainConfig, pad_id: int) -> torch.Tensor:
    """The trainer's log-probs before the step (as verl recomputes them). The first mini-batch's come from its own
    pre-update forward in :func:`update`; the others need this no-grad pass."""
    old = torch.zeros_like(batch["sampler_logprobs"])
    with torch.no_grad():
        for rows, micros in zip(minis[1:], plan[1:]):
            for idx in micros:
                sub = _micro(batch, idx, rows[0])
                lp, _ = response_logprobs(model, sub["prompt_ids"], sub["response"], sub["mask"], pad_id,
                                          cfg.temperature, shared_prefix=not cfg.gradient_checkpointing)
                if idx:
                    old[torch.tensor(idx)] = lp.float().cpu()
    return old


def _train_minibatch(engine: Engine, batch, rows, micros, old, ctx_all, algo, params, cfg, pad_id, first: bool,
                     stats: UpdateStats, reference: bool = False) -> float | None:
    """Forward/backward of the mini-batch's micro-batches and one optimizer step; returns the grad norm (None: not
    measured by the engine)."""
    at_mini = torch.tensor(rows)
    # the mini-batch's denominator (split-invariant), or None: each micro-batch reduced on its own, its losses summed
    # (train.normalizer "micro_batch": verl's token mean as the official code runs it)
    normalizer = (loss_normalizer(algo, mask=batch["mask"][at_mini], rewards=batch["rewards"][at_mini], params=params)
                  if cfg.normalizer == "mini_batch" else None)
    mini_loss = 0.0
    for j, idx in enumerate(micros):
        micro = _micro(batch, idx, rows[0])
        at = torch.tensor(idx or [rows[0]])
        logp, ent = response_logprobs(engine.model, micro["prompt_ids"], micro["response"], micro["mask"], pad_id,
                                      cfg.temperature, with_entropy=True,
                                      shared_prefix=not cfg.gradient_checkpointing)
        logp = logp.float()
        dev = logp.device  # the loss is computed where the model is (inputs stay on the CPU)
        if first and idx and not reference:
            old[at] = logp.detach().cpu()
        if engine.dist.world == 1 and not torch.isfinite(logp.detach()[micro["mask"].to(dev) > 0]).all():
            return _skip(engine, batch, rows, "non-finite log-probs")
        loss, met = policy_loss(algo, logp=logp, old_logp=old[at].to(dev), mask=micro["mask"].to(dev),
                                rewards=micro["rewards"].to(dev), group_ids=micro["group_ids"].to(dev),
                                group_rate=ctx_all["group_rate"][at].to(dev),
                                group_std=ctx_all["group_std"][at].to(dev), normalizer=normalizer, params=params)
        if engine.dist.world == 1 and not torch.isfinite(loss.detach()):
            return _skip(engine, batch, rows, "a non-finite loss")
        engine.backward(loss, last=j == len(micros) - 1)
        if not idx:
            continue
        mini_loss += met["loss"]
        stats.add_micro(met, float(micro["mask"].sum()), float((ent.float().cpu() * micro["mask"]).sum()))
    stats.step_losses.append(mini_loss)
    norm = engine.step()
    if norm is not None and not math.isfinite(norm):
        _say_skipped(batch, rows, "a non-finite gradient norm")
    return norm


def _say_skipped(batch: dict, rows: list[int], why: str) -> None:
    print(f"train: optimizer step skipped ({why}) on the step's questions "
          f"{sorted(set(batch['group_ids'][torch.tensor(rows)].tolist()))}", file=sys.stderr)


def _skip(engine: Engine, batch: dict, rows: list[int], why: str) -> float:
    """Drop the mini-batch's accumulated gradient without an optimizer step (one process: nothing to keep in step
    with), say which questions of the step's batch it held; NaN tells the loop it was skipped."""
    engine.discard()
    _say_skipped(batch, rows, why)
    return float("nan")


def update(engine: Engine, batch: dict, algo: str, overrides: dict, cfg: TrainConfig, pad_id: int, seed: int,
           step: int, trace: list | None = None) -> dict[str, float]:
    """Old log-probs, then one optimizer step per mini-batch of questions. Returns the step's metrics; ``trace``, if
    given, receives each optimizer step's loss."""
    dist = engine.dist
    params = make_params(algo, **overrides)  # validated once per step, not per micro-batch
    minis, plan = plan_minibatches(batch, cfg, seed, step, dist)
    reference = get_spec(algo).reference  # supervised rows: no sampling policy, old log-probs stay 0
    t0 = time.perf_counter()
    old = torch.zeros_like(batch["sampler_logprobs"]) if reference else old_logprobs(engine.model, batch, minis, plan,
                                                                                      cfg, pad_id)
    t_old = time.perf_counter() - t0
    # group statistics of the whole rollout batch (full groups; RFT's rows are positives only)
    ctx_all = batch_context(algo, mask=batch["mask"], rewards=batch["rewards"], group_ids=batch["group_ids"],
                            params=params)
    stats = UpdateStats()
    t1 = time.perf_counter()
    grad_norms = [_train_minibatch(engine, batch, rows, micros, old, ctx_all, algo, params, cfg, pad_id, m == 0,
                                   stats, reference) for m, (rows, micros) in enumerate(zip(minis, plan))]
    t_update = time.perf_counter() - t1
    # a non-finite norm: that optimizer step was not applied (None: the engine did not measure it)
    finite = [g for g in grad_norms if g is not None and math.isfinite(g)]
    nonfinite = sum(g is not None and not math.isfinite(g) for g in grad_norms)
    mine = [i for micros in plan for idx in micros for i in idx]
    mismatch = (old[mine] - batch["sampler_logprobs"][mine]).abs()[batch["mask"][mine] > 0]
    stats.mismatch_sum, stats.mismatch_count = float(mismatch.sum()), int(mismatch.numel())
    stats.mismatch_max = float(mismatch.max()) if mismatch.numel() else 0.0
    if dist.world > 1:  # add up the ranks' shares
        stats = UpdateStats.merge(dist.gather(stats))
    if trace is not None:
        trace.extend(stats.step_losses)
    return {
        "train/batch_entropy": stats.entropy_sum / max(stats.tokens, 1.0),
        "train/grad_norm": float(np.mean(finite)) if finite else float("nan"),
        "train/grad_norm_max": float(np.max(finite)) if finite else float("nan"),
        "train/skipped_steps": float(nonfinite),
        "train/lr": engine.lr,
        "train/optimizer_steps": float(len(minis)),
        "train/answers": float(len(batch["prompt_ids"])),
        "train/tokens": stats.tokens,
        "logprob/mismatch_mean": stats.mismatch_sum / stats.mismatch_count if stats.mismatch_count else 0.0,
        "logprob/mismatch_max": stats.mismatch_max,
        "time/old_logprob": t_old,
        "time/update": t_update,
        "perf/train_tokens_per_s": stats.tokens / max(t_update, 1e-9),
        **stats.metrics(len(minis)),
    }
