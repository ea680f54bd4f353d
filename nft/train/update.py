"""Steps 2-3 of a rollout step: old log-probs, then one optimizer step per mini-batch of questions, each accumulated
over micro-batches (exact: ``nft.algorithms.core``).

Under several processes every rank knows every row's metadata (reward, length, group) but holds the tensors (prompt,
answer, sampler log-probs) of the rows it trains on only: its share of each mini-batch (``nft.train.engines``), moved
to it by :func:`localize` from the rank that sampled them. The normaliser is the whole mini-batch's (from the
lengths), so the shares' losses add up to the one-process loss. How each logged metric combines
over micro-batches and ranks is declared once, in :data:`REDUCTION`.
"""

from __future__ import annotations

import heapq
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


#: a batch's per-row tensors (what a rank holds for its own rows only); the other keys are every row's metadata
ROW_KEYS = ("prompt_ids", "response", "mask", "sampler_logprobs")


def _at(batch: dict, idx) -> torch.Tensor:
    """Where rows (global indices) are in the batch's row tensors: themselves, or (a rank's localized batch) the
    positions ``batch["local"]`` gives."""
    t = torch.as_tensor(idx, dtype=torch.long)
    if "local" not in batch:
        return t
    at = batch["local"][t]
    if (at < 0).any():
        raise RuntimeError(f"update: rows {t[at < 0].tolist()[:5]} are not held by this rank")
    return at


def _rows(batch: dict, idx: list[int]) -> dict:
    t, at = torch.tensor(idx, dtype=torch.long), _at(batch, idx)
    out = {}
    for k, v in batch.items():
        if k in ("local", "T"):
            continue
        i = at if k in ROW_KEYS else t
        out[k] = [v[j] for j in i.tolist()] if isinstance(v, list) else v[i]
    return out


def _width(batch: dict) -> int:
    """The batch's answer width (its longest answer: the row tensors' width)."""
    return int(batch.get("T", batch["response"].shape[1]))


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """The response mask of rows of these lengths (answers are contiguous from their first token)."""
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def seq_lengths(batch: dict) -> torch.Tensor:
    """Each row's tokens, prompt and answer (what a token budget counts: verl's effective sequence length)."""
    prompt = batch.get("prompt_lengths")
    if prompt is None:  # a batch holding every row (built by hand or the supervised control's)
        prompt = torch.tensor([len(p) for p in batch["prompt_ids"]], dtype=torch.long)
    return prompt + batch["lengths"]


class _Split:
    """A partial split of items into k sets (largest sum first), ordered as verl's Karmarkar-Karp states: the
    largest spread first, then the largest first set."""

    def __init__(self, sets: list[tuple[int, list]]):
        self.sets = sorted(sets, key=_set_key, reverse=True)

    @property
    def spread(self) -> int:
        return self.sets[0][0] - self.sets[-1][0]

    def __lt__(self, other: _Split) -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return _set_key(self.sets[0]) > _set_key(other.sets[0])


def _set_key(s: tuple[int, list]):
    return s[0], len(s[1]), s[1]


def balanced_partition(sizes: list[int], k: int) -> list[list[int]]:
    """Indices of ``sizes`` in ``k`` sets of near-equal sums by the largest differencing method (Karmarkar-Karp),
    as verl's ``get_seqlen_balanced_partitions`` (``equal_size=False``): the sets largest sum first, each in index
    order. With fewer items than sets, the last sets are empty."""
    if k < 1:
        raise ValueError(f"balanced_partition: k must be >= 1, got {k}")
    heap = [_Split([(n, [(i, n)])] + [(0, [])] * (k - 1)) for n, i in sorted((n, i) for i, n in enumerate(sizes))]
    heapq.heapify(heap)
    while len(heap) > 1:
        a, b = (
            heapq.heappop(heap),
            heapq.heappop(heap),
        )  # the two largest spreads: their sets paired largest to smallest
        heapq.heappush(heap, _Split([(x[0] + y[0], x[1] + y[1]) for x, y in zip(a.sets, reversed(b.sets))]))
    return [sorted(i for i, _ in items) for _, items in heap[0].sets] if heap else [[] for _ in range(k)]


def _units(batch: dict, share: list[int], normalizer: str) -> list[list[int]]:
    """What a token split balances: single answers (the official split: with ``normalizer: micro_batch`` each
    micro-batch's own denominator makes the split matter), or whole questions (``mini_batch``: the split leaves the
    step as it is, and a question's answers together run its prompt once per pass)."""
    if normalizer != "mini_batch":
        return [[i] for i in share]
    units: dict[int, list[int]] = {}
    for i in share:
        units.setdefault(int(batch["group_ids"][i]), []).append(i)
    return list(units.values())


def plan_minibatches(batch: dict, cfg: TrainConfig, seed: int, step: int, dist: Dist, rank: int | None = None):
    """``(minis, plan)``: the mini-batches and a rank's (default: this one's) plan (:func:`plan_all_ranks`)."""
    minis, plans = plan_all_ranks(batch, cfg, seed, step, dist)
    return minis, plans[dist.rank if rank is None else rank]


def plan_all_ranks(batch: dict, cfg: TrainConfig, seed: int, step: int, dist: Dist):
    """``(minis, plans)``: the mini-batches (row lists of whole questions, in a seeded order) and every rank's
    micro-batches of each (``plans[rank]``): its share, rows ``rank::world``, in chunks of ``micro_batch_size`` or
    (with ``micro_batch_tokens``) in balanced sets of at most about that many tokens. Every rank gets the same number
    of micro-batches, empty lists where it ran out, so the collectives of a sharded model line up."""
    groups = batch["group_ids"].unique().tolist()
    random.Random(derive_seed(seed, "minibatch", step)).shuffle(groups)
    n_mini = max(1, math.ceil(len(groups) / cfg.mini_batch_prompts))
    mini_of = {g: m for m in range(n_mini) for g in groups[m::n_mini]}
    minis: list[list[int]] = [[] for _ in range(n_mini)]
    for i, g in enumerate(batch["group_ids"].tolist()):
        minis[mini_of[g]].append(i)
    minis = [m for m in minis if m]
    mb, budget = cfg.micro_batch_size, cfg.micro_batch_tokens
    seq = seq_lengths(batch).tolist() if budget else None
    plans: list[list] = [[] for _ in range(dist.world)]
    for rows in minis:
        if budget:  # as verl's rearrange_micro_batches: the largest count over ranks, then balanced sets
            assert seq is not None  # computed whenever budget is set
            shares = [_units(batch, rows[q :: dist.world], cfg.normalizer) for q in range(dist.world)]
            # no more micro-batches than a rank has units (verl: than rows), so none is empty on every rank
            n = max(
                1,
                min(
                    max(math.ceil(sum(seq[i] for u in us for i in u) / budget) for us in shares),
                    max(len(us) for us in shares),
                ),
            )
            for plan, units in zip(plans, shares):
                parts = balanced_partition([sum(seq[i] for i in u) for u in units], n)
                plan.append([sorted(i for u in part for i in units[u]) for part in parts])
        else:
            n = max(1, math.ceil(math.ceil(len(rows) / dist.world) / mb))
            for r, plan in enumerate(plans):
                share = rows[r :: dist.world]
                plan.append([share[s * mb : (s + 1) * mb] for s in range(n)])
    return minis, plans


def needed_rows(minis, plan) -> list[int]:
    """The rows a rank's plan trains on, plus the first row of each mini-batch where it has an empty micro-batch (the
    stand-in :func:`_micro` runs with an empty mask)."""
    need = {i for micros in plan for idx in micros for i in idx}
    need |= {rows[0] for rows, micros in zip(minis, plan) if any(not idx for idx in micros)}
    return sorted(need)


def _pack_rows(batch: dict, rows: list[int]) -> dict:
    """Rows to send, as few tensors: each answer cut to its length and concatenated (token ids as int32; the mask
    is not sent, it is the length), the prompts as lists."""
    at = _at(batch, rows).tolist()
    n = [int(batch["lengths"][i]) for i in rows]
    return {
        "rows": rows,
        "lengths": n,
        "prompt_ids": [batch["prompt_ids"][j] for j in at],
        "response": torch.cat([batch["response"][j, :k] for j, k in zip(at, n)]).int() if rows else None,
        "sampler_logprobs": torch.cat([batch["sampler_logprobs"][j, :k] for j, k in zip(at, n)]) if rows else None,
    }


def _unpack_rows(piece: dict) -> dict[int, tuple]:
    """``row -> (prompt ids, answer ids, sampler log-probs)`` from :func:`_pack_rows`."""
    if not piece["rows"]:
        return {}
    resp = piece["response"].long().split(piece["lengths"])
    lps = piece["sampler_logprobs"].split(piece["lengths"])
    return {i: (p, r, lp) for i, p, r, lp in zip(piece["rows"], piece["prompt_ids"], resp, lps)}


def localize(batch: dict, minis, cfg: TrainConfig, seed: int, step: int, dist: Dist, plans=None) -> dict:
    """This rank's batch: every row's metadata, and the row tensors of the rows its plan needs, nothing else. Rows
    it sampled stay; the others come from the rank that sampled them (``batch["owner"]``), each row sent to the
    ranks that need it only. A batch every rank holds whole (the supervised control's) is cut down without
    exchange. ``plans``: every rank's plan, if already made."""
    plans = plans or plan_all_ranks(batch, cfg, seed, step, dist)[1]
    need = [needed_rows(minis, p) for p in plans]
    B = len(batch["rewards"])
    if "owner" not in batch:  # every row here: keep the needed ones
        mine = torch.tensor(need[dist.rank], dtype=torch.long)
        held = {
            k: ([batch[k][i] for i in mine.tolist()] if isinstance(batch[k], list) else batch[k][mine])
            for k in ROW_KEYS
        }
    else:
        owner = batch["owner"]
        send = [_pack_rows(batch, [i for i in need[r] if int(owner[i]) == dist.rank]) for r in range(dist.world)]
        got: dict[int, tuple] = {}
        for piece in dist.exchange(send):
            got.update(_unpack_rows(piece))
        mine = torch.tensor(need[dist.rank], dtype=torch.long)
        rows = [got[i] for i in mine.tolist()]
        T = _width(batch)
        held = {"prompt_ids": [r[0] for r in rows]}
        for j, k in enumerate(("response", "sampler_logprobs"), start=1):
            t = [torch.nn.functional.pad(r[j], (0, T - r[j].shape[0])) for r in rows]
            held[k] = torch.stack(t) if t else batch[k][:0]
        held["mask"] = length_mask(batch["lengths"][mine], T)
    local = torch.full((B,), -1, dtype=torch.long)
    local[mine] = torch.arange(len(mine))
    meta = {k: v for k, v in batch.items() if k not in ROW_KEYS and k not in ("owner", "local")}
    return {**meta, **held, "local": local, "T": _width(batch)}


#: the fixed cost of a forward pass besides its positions (kernel launches, small matrices), in positions: about
#: 20 ms of a 4-layer, 256-wide model's update on 2 CPU cores, where one position costs about 0.45 ms
PASS_COST = 48


def answer_passes(batch: dict, idx: list[int], budget: int) -> list[list[int]]:
    """A micro-batch's rows as forward passes of like answer lengths, each cut to its own longest answer: rows by
    answer length (longest first) cut into runs that minimise the positions run -- rows x longest answer, plus each
    pass's prompt pass (its questions x longest prompt) and :data:`PASS_COST` -- with no run over ``budget`` positions
    (rows x (longest prompt + longest answer)) unless it is one row. The micro-batch's loss (its denominator is the
    whole micro-batch's) is the sum of its passes' losses, so the step is the same; only the padding run shrinks."""
    if not idx:
        return [idx]
    order = sorted(idx, key=lambda i: (-int(batch["lengths"][i]), i))
    n = [int(batch["lengths"][i]) for i in order]
    prompt = [int(x) for x in (seq_lengths(batch)[order] - batch["lengths"][order])]
    group = [int(batch["group_ids"][i]) for i in order]
    best = [0.0] + [math.inf] * len(order)  # best[j]: the cost of the first j rows
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest_prompt, questions = 0, set()
        for i in range(j - 1, -1, -1):  # the last pass is rows i..j-1, its longest answer n[i]
            longest_prompt = max(longest_prompt, prompt[i])
            questions.add(group[i])
            rows = j - i
            if rows > 1 and rows * (n[i] + longest_prompt) > budget:
                break
            cost = best[i] + rows * n[i] + len(questions) * longest_prompt + PASS_COST
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], len(order)
    while j:
        passes.append(order[cut[j] : j])
        j = cut[j]
    return passes[::-1]


def _micro(batch: dict, rows: list[int], first: int, trim: bool = False) -> dict:
    """The rows, or (a rank with nothing left) one row of the mini-batch with an empty mask: it runs forward and
    backward like the others and adds nothing. ``trim``: the row tensors cut to these rows' longest answer."""
    sub = _rows(batch, rows or [first])
    if not rows:
        sub["mask"] = torch.zeros_like(sub["mask"])
    if trim:
        w = max(1, int(sub["lengths"].max()))
        for k in ("response", "mask", "sampler_logprobs"):
            sub[k] = sub[k][:, :w]
    return sub


def forward_passes(batch: dict, plans: list, cfg: TrainConfig, rank: int) -> list[list]:
    """Per mini-batch, rank ``rank``'s forward passes as ``(micro-batch rows, pass rows)``: each micro-batch whole,
    or (by tokens) its :func:`answer_passes`, with empty passes added up to the most any rank runs for that
    micro-batch, so the collectives of a sharded model line up. ``plans``: every rank's plan (every rank knows every
    row's lengths)."""
    budget = cfg.micro_batch_tokens
    if not budget:
        return [[(idx, idx) for idx in micros] for micros in plans[rank]]
    out = []
    for m, micros in enumerate(plans[rank]):
        passes = []
        for j, idx in enumerate(micros):
            each = [answer_passes(batch, plan[m][j], budget) for plan in plans]
            mine = each[rank]
            passes += [(idx, part) for part in mine] + [(idx, [])] * (max(map(len, each)) - len(mine))
        out.append(passes)
    return out


def old_logprobs(model, batch: dict, minis, passes, cfg: TrainConfig, pad_id: int) -> torch.Tensor:
    """The trainer's log-probs before the step (as verl recomputes them). The first mini-batch's come from its own
    pre-update forward in :func:`update`; the others need this no-grad pass."""
    old = torch.zeros_like(batch["sampler_logprobs"])  # indexed like the batch's row tensors
    trim = cfg.micro_batch_tokens > 0
    with torch.no_grad():
        for rows, mini_passes in zip(minis[1:], passes[1:]):
            for idx, part in mini_passes:
                sub = _micro(batch, part, (idx or rows)[0], trim=trim)
                lp, _ = response_logprobs(
                    model,
                    sub["prompt_ids"],
                    sub["response"],
                    sub["mask"],
                    pad_id,
                    cfg.temperature,
                    shared_prefix=not cfg.gradient_checkpointing,
                )
                if part:
                    old[_at(batch, part), : lp.shape[1]] = lp.float().cpu()
    return old


def _train_minibatch(
    engine: Engine,
    batch,
    rows,
    passes,
    old,
    ctx_all,
    algo,
    params,
    cfg,
    pad_id,
    first: bool,
    stats: UpdateStats,
    reference: bool = False,
) -> float | None:
    """Forward/backward of the mini-batch's passes (:func:`forward_passes`) and one optimizer step; returns the grad
    norm (None: not measured by the engine)."""
    at_mini = torch.tensor(rows)
    # the mini-batch's denominator (split-invariant), or None: each micro-batch reduced on its own, its losses summed
    # (train.normalizer "micro_batch": verl's token mean as the official code runs it)
    normalizer = (
        loss_normalizer(
            algo,
            mask=length_mask(batch["lengths"][at_mini], _width(batch)),
            rewards=batch["rewards"][at_mini],
            params=params,
        )
        if cfg.normalizer == "mini_batch"
        else None
    )
    mini_loss = 0.0
    trim = cfg.micro_batch_tokens > 0
    micro_norms: dict[tuple, float] = {}  # normalizer micro_batch with passes: each micro-batch's own, computed once
    for j, (idx, part) in enumerate(passes):
        stand_in = (idx or rows)[0]  # a row this rank holds, run with an empty mask where the pass is empty
        micro = _micro(batch, part, stand_in, trim=trim)
        at = torch.tensor(part or [stand_in])
        at_row = _at(batch, part or [stand_in])  # where its row tensors (and old log-probs) are
        w = micro["response"].shape[1]
        logp, ent = response_logprobs(
            engine.model,
            micro["prompt_ids"],
            micro["response"],
            micro["mask"],
            pad_id,
            cfg.temperature,
            with_entropy=True,
            shared_prefix=not cfg.gradient_checkpointing,
        )
        logp = logp.float()
        dev = logp.device  # the loss is computed where the model is (inputs stay on the CPU)
        if first and part and not reference:
            old[at_row, :w] = logp.detach().cpu()
        if engine.dist.world == 1 and not torch.isfinite(logp.detach()[micro["mask"].to(dev) > 0]).all():
            return _skip(engine, batch, rows, "non-finite log-probs")
        micro_norm = normalizer
        if trim and normalizer is None:  # the whole micro-batch's own denominator, as its untrimmed rows give it
            if tuple(idx) not in micro_norms:
                at_micro = torch.tensor(idx, dtype=torch.long)
                micro_norms[tuple(idx)] = loss_normalizer(
                    algo,
                    mask=length_mask(batch["lengths"][at_micro], _width(batch)),
                    rewards=batch["rewards"][at_micro],
                    params=params,
                )
            micro_norm = micro_norms[tuple(idx)]
        loss, met = policy_loss(
            algo,
            logp=logp,
            old_logp=old[at_row, :w].to(dev),
            mask=micro["mask"].to(dev),
            rewards=micro["rewards"].to(dev),
            group_ids=micro["group_ids"].to(dev),
            group_rate=ctx_all["group_rate"][at].to(dev),
            group_std=ctx_all["group_std"][at].to(dev),
            normalizer=micro_norm,
            params=params,
        )
        if engine.dist.world == 1 and not torch.isfinite(loss.detach()):
            return _skip(engine, batch, rows, "a non-finite loss")
        engine.backward(loss, last=j == len(passes) - 1)
        if not part:
            continue
        mini_loss += met["loss"]
        stats.add_micro(met, float(micro["mask"].sum()), float((ent.float().cpu() * micro["mask"]).sum()))
    stats.step_losses.append(mini_loss)
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
    ctx_all = batch_context(
        algo,
        mask=length_mask(batch["lengths"], _width(batch)),
        rewards=batch["rewards"],
        group_ids=batch["group_ids"],
        params=params,
    )
    stats = UpdateStats()
    t1 = time.perf_counter()
    grad_norms = [
        _train_minibatch(
            engine, batch, rows, mini_passes, old, ctx_all, algo, params, cfg, pad_id, m == 0, stats, reference
        )
        for m, (rows, mini_passes) in enumerate(zip(minis, passes))
    ]
    t_update = time.perf_counter() - t1
    # a non-finite norm: that optimizer step was not applied (None: the engine did not measure it)
    finite = [g for g in grad_norms if g is not None and math.isfinite(g)]
    nonfinite = sum(g is not None and not math.isfinite(g) for g in grad_norms)
    mine = [i for micros in plan for idx in micros for i in idx]
    at_mine = _at(batch, mine)
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
