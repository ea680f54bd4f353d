"""Steps 2-3 of a rollout step: old log-probs, then one optimizer step per mini-batch of questions, each accumulated
over micro-batches (exact: ``nft.algorithms.core``).

The work is planned by :mod:`nft.train.plan`; under several processes each rank holds the row tensors of its own
share only (:mod:`nft.train.rows`). The normaliser is the whole mini-batch's (from the lengths), so the shares' losses
add up to the one-process loss. How each logged metric combines over micro-batches and ranks is declared once, in
:data:`REDUCTION`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..algorithms import batch_context, batch_rule, get_spec, loss_normalizer, make_params, policy_loss
from ..modeling import length_mask, response_logprobs
from .config import TrainConfig
from .engines import Engine
from .plan import forward_passes, plan_all_ranks, seq_lengths
from .rows import answer_width, localize, micro_rows, row_at

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
    def merge(parts: list[UpdateStats]) -> UpdateStats:
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


def old_logprobs(model, batch: dict, minis, passes, cfg: TrainConfig, pad_id: int) -> torch.Tensor:
    """The trainer's log-probs before the step (as verl recomputes them). The first mini-batch's come from its own
    pre-update forward in :func:`update`; the others need this no-grad pass."""
    old = torch.zeros_like(batch["sampler_logprobs"])  # indexed like the batch's row tensors
    trim = cfg.micro_batch_tokens > 0
    with torch.no_grad():
        for rows, mini_passes in zip(minis[1:], passes[1:]):
            for idx, part in mini_passes:
                sub = micro_rows(batch, part, (idx or rows)[0], trim=trim)
                lp, _ = response_logprobs(
                    model,
                    sub["prompt_ids"],
                    sub["response"],
                    sub["mask"],
                    pad_id,
                    cfg.temperature,
                    shared_prefix=not cfg.gradient_checkpointing,
                    chunk_mb=cfg.logprob_chunk_mb,
                )
                if part:
                    old[row_at(batch, part), : lp.shape[1]] = lp.float().cpu()
    return old


@dataclass
class _Step:
    """What every mini-batch of a step's update shares."""

    engine: Engine
    batch: dict
    old: torch.Tensor  # old log-probs, indexed like the batch's row tensors; the first mini-batch fills its own
    ctx_all: dict  # group statistics of the whole rollout batch
    algo: str
    params: object
    cfg: TrainConfig
    pad_id: int
    reference: bool  # supervised rows: old log-probs stay 0
    rule: str  # the run's batch rule (nft.algorithms.batch_rule)
    stats: UpdateStats

    def normalizer(self, rows: list[int]) -> float:
        """The loss denominator of these rows as one reduction (a mini-batch's, or a micro-batch's own)."""
        at = torch.tensor(rows, dtype=torch.long)
        return loss_normalizer(
            self.algo,
            mask=length_mask(self.batch["lengths"][at], answer_width(self.batch)),
            rewards=self.batch["rewards"][at],
            params=self.params,
            rule=self.rule,
        )


def _train_minibatch(st: _Step, rows: list[int], passes: list, first: bool) -> float | None:
    """Forward/backward of the mini-batch's passes (:func:`nft.train.plan.forward_passes`) and one optimizer step;
    returns the grad norm (None: not measured by the engine; NaN: skipped)."""
    engine, batch, cfg = st.engine, st.batch, st.cfg
    # the mini-batch's denominator (split-invariant), or None: each micro-batch reduced on its own, its losses summed
    # (train.normalizer "micro_batch": verl's token mean as the official code runs it)
    normalizer = st.normalizer(rows) if cfg.normalizer == "mini_batch" else None
    mini_loss = 0.0
    trim = cfg.micro_batch_tokens > 0
    micro_norms: dict[tuple, float] = {}  # normalizer micro_batch with passes: each micro-batch's own, once
    for j, (idx, part) in enumerate(passes):
        stand_in = (idx or rows)[0]  # a row this rank holds, run with an empty mask where the pass is empty
        micro = micro_rows(batch, part, stand_in, trim=trim)
        at = torch.tensor(part or [stand_in])
        at_row = row_at(batch, part or [stand_in])  # where its row tensors (and old log-probs) are
        w = micro["response"].shape[1]
        logp, ent = response_logprobs(
            engine.model,
            micro["prompt_ids"],
            micro["response"],
            micro["mask"],
            st.pad_id,
            cfg.temperature,
            with_entropy=True,
            shared_prefix=not cfg.gradient_checkpointing,
            chunk_mb=cfg.logprob_chunk_mb,
        )
        logp = logp.float()
        dev = logp.device  # the loss is computed where the model is (inputs stay on the CPU)
        if first and part and not st.reference:
            st.old[at_row, :w] = logp.detach().cpu()
        if engine.discards_early and not torch.isfinite(logp.detach()[micro["mask"].to(dev) > 0]).all():
            return _skip(engine, batch, rows, "non-finite log-probs")
        micro_norm = normalizer
        if trim and normalizer is None:  # the whole micro-batch's own denominator, as its untrimmed rows give it
            if tuple(idx) not in micro_norms:
                micro_norms[tuple(idx)] = st.normalizer(idx)
            micro_norm = micro_norms[tuple(idx)]
        loss, met = policy_loss(
            st.algo,
            logp=logp,
            old_logp=st.old[at_row, :w].to(dev),
            mask=micro["mask"].to(dev),
            rewards=micro["rewards"].to(dev),
            group_ids=micro["group_ids"].to(dev),
            group_rate=st.ctx_all["group_rate"][at].to(dev),
            group_std=st.ctx_all["group_std"][at].to(dev),
            normalizer=micro_norm,
            params=st.params,
            rule=st.rule,
        )
        if engine.discards_early and not torch.isfinite(loss.detach()):
            return _skip(engine, batch, rows, "a non-finite loss")
        engine.backward(loss, last=j == len(passes) - 1)
        if not part:
            continue
        mini_loss += met["loss"]
        st.stats.add_micro(met, float(micro["mask"].sum()), float((ent.float().cpu() * micro["mask"]).sum()))
    st.stats.step_losses.append(mini_loss)
    norm = engine.step()
    if norm is not None and not math.isfinite(norm):
        _say_skipped(batch, rows, "a non-finite gradient norm")
    return norm


def _say_skipped(batch: dict, rows: list[int], why: str) -> None:
    print(
        f"train: optimizer step skipped ({why}) on the step's questions "
        f"{sorted(set(batch['group_ids'][torch.tensor(rows)].tolist()))}",
        file=sys.stderr,
    )


def _skip(engine: Engine, batch: dict, rows: list[int], why: str) -> float:
    """Drop the mini-batch's accumulated gradient without an optimizer step (one process: nothing to keep in step
    with), say which questions of the step's batch it held; NaN tells the loop it was skipped."""
    engine.discard()
    _say_skipped(batch, rows, why)
    return float("nan")


def update(
    engine: Engine,
    batch: dict,
    algo: str,
    overrides: dict,
    cfg: TrainConfig,
    pad_id: int,
    seed: int,
    step: int,
    trace: list | None = None,
) -> dict[str, float]:
    """Old log-probs, then one optimizer step per mini-batch of questions. Returns the step's metrics; ``trace``, if
    given, receives each optimizer step's loss."""
    dist = engine.dist
    params = make_params(algo, **overrides)  # validated once per step, not per micro-batch
    if "prompt_lengths" not in batch:  # a batch built whole (by hand): its prompt lengths as metadata, once
        batch = {**batch, "prompt_lengths": seq_lengths(batch) - batch["lengths"]}
    # every rank's plan (each rank needs the others' to know what to send and how many passes to run)
    minis, plans = plan_all_ranks(batch, cfg, seed, step, dist)
    plan = plans[dist.rank]
    if dist.world > 1:  # hold the rows this rank trains on, and only those
        batch = localize(batch, minis, cfg, seed, step, dist, plans)
    reference = get_spec(algo).reference  # supervised rows: no sampling policy, old log-probs stay 0
    t0 = time.perf_counter()
    passes = forward_passes(batch, plans, cfg, dist.rank)
    old = (
        torch.zeros_like(batch["sampler_logprobs"])
        if reference
        else old_logprobs(engine.model, batch, minis, passes, cfg, pad_id)
    )
    t_old = time.perf_counter() - t0
    # group statistics of the whole rollout batch (full groups; RFT's rows are positives only)
    rule = batch_rule(algo, cfg.batch_rule)
    ctx_all = batch_context(
        algo,
        mask=length_mask(batch["lengths"], answer_width(batch)),
        rewards=batch["rewards"],
        group_ids=batch["group_ids"],
        params=params,
        rule=rule,
    )
    stats = UpdateStats()
    st = _Step(engine, batch, old, ctx_all, algo, params, cfg, pad_id, reference, rule, stats)
    t1 = time.perf_counter()
    grad_norms = [
        _train_minibatch(st, rows, mini_passes, m == 0) for m, (rows, mini_passes) in enumerate(zip(minis, passes))
    ]
    t_update = time.perf_counter() - t1
    # a non-finite norm: that optimizer step was not applied (None: the engine did not measure it)
    finite = [g for g in grad_norms if g is not None and math.isfinite(g)]
    nonfinite = sum(g is not None and not math.isfinite(g) for g in grad_norms)
    mine = [i for micros in plan for idx in micros for i in idx]
    at_mine = row_at(batch, mine)
    mismatch = (old[at_mine] - batch["sampler_logprobs"][at_mine]).abs()[batch["mask"][at_mine] > 0]
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
        "train/answers": float(len(batch["rewards"])),
        "train/tokens": stats.tokens,
        "logprob/mismatch_mean": stats.mismatch_sum / stats.mismatch_count if stats.mismatch_count else 0.0,
        "logprob/mismatch_max": stats.mismatch_max,
        "time/old_logprob": t_old,
        "time/update": t_update,
        "perf/train_tokens_per_s": stats.tokens / max(t_update, 1e-9),
        **stats.metrics(len(minis)),
    }
