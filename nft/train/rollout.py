"""Step 1 of a rollout step: draw P questions, sample K answers each, grade them, keep what the batch rule trains on.

The batch rule is the algorithm's (``nft.algorithms.keep_rows``): ``dynamic`` samples more generation batches until
P groups with mixed answers are kept (or ``train.max_num_gen_batches`` is spent), ``positives`` keeps the correct
answers only, ``all`` everything. Under several processes every rank draws the same P questions, samples and grades
its share (``Sampler.shard``), and the ranks exchange :class:`RolloutShard` records without tensors: every rank
returns the same batch metadata (rewards, lengths, groups, who sampled each row), ordered as one process would have
kept it, and the row tensors of the rows it sampled; the update moves each row to the rank that trains on it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..algorithms import keep_rows
from ..data.prompts import END_OF_TURN, render_prompt
from ..dist import Dist
from ..modeling import length_mask, pad_id
from ..reward import GraderPool
from ..rollout.base import Sampler
from .config import TrainConfig
from .seeds import Cursor, derive_seed


@dataclass
class RolloutShard:
    """What one share of the questions produced in a rollout step (one record per rank, exchanged by name)."""

    kept: list[tuple[int, int, dict]] = field(default_factory=list)
    """kept groups as (generation batch, question position, rows): the rows the rule keeps, with their tensors."""
    rewards: list[torch.Tensor] = field(default_factory=list)
    """per generation batch, the rewards of every sampled answer (before the rule)."""
    lengths: list[torch.Tensor] = field(default_factory=list)
    finished: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    entropy_sum: float = 0.0
    """the sampling distribution's entropy summed over every sampled token (before the batch rule)."""
    t_sample: float = 0.0
    t_grade: float = 0.0
    grader_timeouts: int = 0
    grader_errors: int = 0

    def metadata(self, rank: int) -> RolloutShard:
        """This record without its row tensors: each kept group's rewards, lengths, width and where its rows are
        (the rank, and the group's index in that rank's ``kept``)."""
        kept = [
            (
                gb,
                pos,
                {
                    "rewards": g["rewards"].tolist(),
                    "lengths": g["lengths"].tolist(),
                    "width": g["response"].shape[1],
                    "prompt_len": len(g["prompt_ids"][0]),
                    "owner": rank,
                    "slot": j,
                },
            )
            for j, (gb, pos, g) in enumerate(self.kept)
        ]
        return RolloutShard(
            kept,
            self.rewards,
            self.lengths,
            self.finished,
            self.tokens,
            self.entropy_sum,
            self.t_sample,
            self.t_grade,
            self.grader_timeouts,
            self.grader_errors,
        )

    @staticmethod
    def merge(parts: list[RolloutShard]) -> RolloutShard:
        """The shards of all ranks as one (times: the slowest rank's)."""
        out = RolloutShard()
        for p in parts:
            out.kept += p.kept
            out.rewards += p.rewards
            out.lengths += p.lengths
            out.finished += p.finished
            out.tokens += p.tokens
            out.entropy_sum += p.entropy_sum
            out.grader_timeouts += p.grader_timeouts
            out.grader_errors += p.grader_errors
        out.t_sample = max(p.t_sample for p in parts)
        out.t_grade = max(p.t_grade for p in parts)
        return out


def collect_rollout(
    sampler: Sampler,
    tokenizer,
    problems,
    cursor: Cursor,
    pool: GraderPool,
    cfg: TrainConfig,
    rule: str,
    seed: int,
    step: int,
    dist: Dist | None = None,
):
    """Sample and grade generation batches until the batch rule has P groups (or the generation budget is spent).

    Returns ``(batch, metrics)``: ``batch`` (``None`` if nothing was kept) holds the kept rows: prompt_ids,
    response, mask, sampler logprobs, rewards, lengths, group ids."""
    dist = dist or Dist()
    P = cfg.prompts_per_step
    G = (cfg.gen_batch_prompts or P) if rule == "dynamic" else P  # questions per generation batch
    shard, shards, leader = sampler.shard(dist)
    mine = list(range(shard, G, shards))
    out = RolloutShard()
    n_kept = gen_batches = 0
    max_batches = cfg.max_num_gen_batches if rule == "dynamic" else 1
    while gen_batches < max_batches and n_kept < P:
        idx = cursor.take(G)
        # one process keeps the seeds of the first version; ranks get their own streams
        sseed = (
            derive_seed(seed, "sample", step, gen_batches)
            if dist.world == 1
            else derive_seed(seed, "sample", step, gen_batches, "rank", shard)
        )
        local = _generation_batch(
            sampler, tokenizer, [problems[idx[j]] for j in mine], mine, pool, cfg, rule, sseed, step, gen_batches, out
        )
        n_kept += int(dist.sum(local if leader else 0))  # every rank takes the same decision
        gen_batches += 1
    if rule == "dynamic" and n_kept < P and cfg.short_batch == "error":
        raise ValueError(
            f"dynamic sampling: {n_kept} of {P} mixed groups after {gen_batches} generation batches of {G} "
            f"questions (step {step}); raise train.max_num_gen_batches or train.gen_batch_prompts, or "
            f"set train.short_batch: train"
        )
    own = [g for _, _, g in out.kept] if leader else []
    if dist.world > 1:  # metadata only: the row tensors stay where they were sampled
        out = RolloutShard.merge([p for p in dist.gather(out.metadata(dist.rank) if leader else None) if p is not None])
    out.kept.sort(key=lambda k: k[:2])
    groups = [k[2] for k in out.kept[:P]]
    batch = stack_metadata(groups, own, dist.rank) if dist.world > 1 else stack_groups(groups)
    return batch, rollout_metrics(out, groups, gen_batches, cfg.answers_per_prompt)


def _generation_batch(
    sampler, tokenizer, questions, positions, pool, cfg, rule, sseed, step, gen_batch, out: RolloutShard
) -> int:
    """Sample K answers to each question, grade them, record them in ``out``; returns the groups kept."""
    K = cfg.answers_per_prompt
    t0 = time.perf_counter()
    ro = sampler.sample(
        [render_prompt(tokenizer, q.question) for q in questions],
        K,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=sseed,
    )
    t1 = time.perf_counter()
    verdicts, gstats = pool.grade_many(
        ro.texts,
        [q.answer for q in questions for _ in range(K)],
        only=None if cfg.grade_truncated else ro.finished.tolist(),
    )
    for err in gstats.errors[:3]:
        print(f"grader: step {step}: {err} (counted as wrong)", file=sys.stderr)
    if gstats.timeouts:
        print(f"grader: step {step}: {gstats.timeouts} answer(s) timed out (counted as wrong)", file=sys.stderr)
    out.grader_timeouts += gstats.timeouts
    out.grader_errors += len(gstats.errors)
    out.t_sample += t1 - t0
    out.t_grade += time.perf_counter() - t1
    out.tokens += int(ro.mask.sum())
    out.entropy_sum += ro.entropy_sum()
    rewards = torch.tensor(verdicts, dtype=torch.bool)
    if not cfg.grade_truncated:  # cut at the length limit: wrong (train.grade_truncated: graded like the others)
        rewards = rewards & ro.finished
    rewards = rewards.double()
    out.rewards.append(rewards)
    out.lengths.append(ro.lengths)
    out.finished.append(ro.finished)
    keep = keep_rows(rule, rewards, torch.arange(len(questions)).repeat_interleave(K))
    kept = 0
    for g, pos in enumerate(positions):
        rows = [i for i in range(g * K, (g + 1) * K) if keep[i]]
        if not rows:
            continue
        at = torch.tensor(rows)
        out.kept.append(
            (
                gen_batch,
                pos,
                {
                    "prompt_ids": [ro.prompt_ids[i] for i in rows],
                    "response": ro.response[at],
                    "mask": ro.mask[at],
                    "logprobs": ro.logprobs[at],
                    "rewards": rewards[at],
                    "lengths": ro.lengths[at],
                },
            )
        )
        kept += 1
    return kept


def rollout_metrics(shard: RolloutShard, groups: list[dict], gen_batches: int, K: int) -> dict[str, float]:
    """The step's ``rollout/``, ``policy/``, ``response/``, ``grader/`` metrics over every sampled answer, before the
    batch rule: ``policy/entropy`` is the policy's mean token entropy (nats) on the answers it sampled, the same
    for every algorithm given the same policy and samples (``train/batch_entropy`` is that of the rows trained on)."""
    rewards = torch.cat(shard.rewards)
    lengths = torch.cat(shard.lengths).double()
    finished = torch.cat(shard.finished)
    rates = [float(r.mean()) for r in rewards.split(K)]
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/accuracy": float(rewards.mean()),
        "rollout/groups_kept_frac": len(groups) / max(len(rates), 1),
        "rollout/groups_kept": float(len(groups)),
        "rollout/gen_batches": float(gen_batches),
        "rollout/all_correct_frac": float(np.mean([r == 1.0 for r in rates])),
        "rollout/all_wrong_frac": float(np.mean([r == 0.0 for r in rates])),
        "policy/entropy": shard.entropy_sum / max(shard.tokens, 1),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_frac": float((~finished).double().mean()),
        "grader/timeouts": float(shard.grader_timeouts),
        "grader/errors": float(shard.grader_errors),
        "time/sample": shard.t_sample,
        "time/grade": shard.t_grade,
        "perf/sample_tokens_per_s": shard.tokens / max(shard.t_sample, 1e-9),
    }


def stack_groups(groups: list[dict]) -> dict | None:
    """One batch of the kept groups' rows (responses right-padded to the longest; group ids 0, 1, ... in order)."""
    if not groups:
        return None
    T = max(g["response"].shape[1] for g in groups)

    def pad(t, fill=0):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)

    return {
        "prompt_ids": [p for g in groups for p in g["prompt_ids"]],
        "response": torch.cat([pad(g["response"]) for g in groups]),
        "mask": torch.cat([pad(g["mask"]) for g in groups]).float(),
        "sampler_logprobs": torch.cat([pad(g["logprobs"]) for g in groups]).float(),
        "rewards": torch.cat([g["rewards"] for g in groups]),
        "lengths": torch.cat([g["lengths"] for g in groups]),
        "prompt_lengths": torch.tensor([len(p) for g in groups for p in g["prompt_ids"]], dtype=torch.long),
        "group_ids": torch.cat([torch.full((len(g["rewards"]),), i, dtype=torch.long) for i, g in enumerate(groups)]),
    }


def stack_metadata(groups: list[dict], own: list[dict], rank: int) -> dict | None:
    """Several processes: the batch's metadata for every row (rewards, lengths, group ids, ``owner``: the rank that
    sampled it, ``local``: its place in this rank's row tensors, -1 if elsewhere) and the row tensors of this rank's
    own rows, as wide as :func:`stack_groups` would make them (``T``)."""
    if not groups:
        return None
    T = max(g["width"] for g in groups)
    mine = [own[g["slot"]] for g in groups if g["owner"] == rank]
    n = [len(g["rewards"]) for g in groups]
    owner = torch.cat([torch.full((k,), g["owner"], dtype=torch.long) for k, g in zip(n, groups)])
    local = torch.full((sum(n),), -1, dtype=torch.long)
    local[owner == rank] = torch.arange(int((owner == rank).sum()))
    rows = stack_groups(mine) if mine else None

    def widen(t):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]))

    return {
        "prompt_ids": rows["prompt_ids"] if rows else [],
        "response": widen(rows["response"]) if rows else torch.zeros((0, T), dtype=torch.long),
        "mask": widen(rows["mask"]) if rows else torch.zeros((0, T)),
        "sampler_logprobs": widen(rows["sampler_logprobs"]) if rows else torch.zeros((0, T)),
        "rewards": torch.tensor([r for g in groups for r in g["rewards"]], dtype=torch.float64),
        "lengths": torch.tensor([x for g in groups for x in g["lengths"]], dtype=torch.long),
        "prompt_lengths": torch.tensor(
            [g["prompt_len"] for g, k in zip(groups, n) for _ in range(k)], dtype=torch.long
        ),
        "group_ids": torch.cat([torch.full((k,), i, dtype=torch.long) for i, k in enumerate(n)]),
        "owner": owner,
        "local": local,
        "T": T,
    }


def reference_batch(tokenizer, problems, cursor: Cursor, cfg: TrainConfig) -> dict:
    """The supervised control's training batch (``LossSpec.reference``): the worked solutions of ``P x K`` fresh
    pool questions, as many rows as an online step's answers, grouped ``K`` to a group so that the mini-batches
    (``mini_batch_prompts`` groups each) and optimizer steps are the online runs'. Rewards are 1; there are no
    sampler log-probs (zeros). Solutions longer than ``max_new_tokens`` are cut there, as sampled answers are."""
    P, K = cfg.prompts_per_step, cfg.answers_per_prompt
    qs = [problems[i] for i in cursor.take(P * K)]
    prompts = tokenizer([render_prompt(tokenizer, q.question) for q in qs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([q.solution + END_OF_TURN for q in qs], add_special_tokens=False)["input_ids"]
    answers = [a[: cfg.max_new_tokens] for a in answers]
    lengths = torch.tensor([len(a) for a in answers])
    T = int(lengths.max())
    response = torch.full((len(qs), T), pad_id(tokenizer), dtype=torch.long)
    for i, a in enumerate(answers):
        response[i, : len(a)] = torch.tensor(a)
    mask = length_mask(lengths, T)
    return {
        "prompt_ids": prompts,
        "response": response,
        "mask": mask,
        "sampler_logprobs": torch.zeros_like(mask),
        "rewards": torch.ones(len(qs), dtype=torch.float64),
        "lengths": lengths,
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
        "group_ids": torch.arange(len(qs)) // K,
    }
