"""How a rollout step's answers are cut into work: mini-batches of whole questions (one optimizer step each), each
rank's micro-batches of them (by count, or balanced by tokens as verl's ``rearrange_micro_batches``), and each
micro-batch's forward passes of like answer lengths. Pure functions of the batch's metadata: every rank computes
every rank's plan, so the ranks agree on what to send and how many collectives to run."""

from __future__ import annotations

import heapq
import math
import random

import torch

from ..dist import Dist
from .config import TrainConfig
from .seeds import derive_seed


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
    stand-in :func:`micro_rows` runs with an empty mask)."""
    need = {i for micros in plan for idx in micros for i in idx}
    need |= {rows[0] for rows, micros in zip(minis, plan) if any(not idx for idx in micros)}
    return sorted(need)


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
