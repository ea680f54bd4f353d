"""Micro-batches by tokens (``train.micro_batch_tokens``, verl's dynamic batch size as the official code runs it):
the balanced split, the plan across ranks, and the update with each micro-batch cut to its own longest answer, which
must equal the update on rows padded to the batch's longest answer (to 1e-6)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from nft.modeling import ModelConfig, build_tiny_qwen2
from nft.train.config import TrainConfig
from nft.train.engines import TorchEngine
from nft.train.plan import balanced_partition, plan_minibatches, seq_lengths
from nft.train.update import update

P, K, T = 6, 4, 24


class _Dist:
    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world


def _batch(seed: int = 0) -> dict:
    """P questions x K answers: prompts of 3-9 tokens, answers of 1-T tokens (one question's short, so its
    mini-batch is cut well below the batch's width), half of each group right."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randrange(3, 10))] for _ in range(P)]
    lengths = torch.tensor(
        [rng.randrange(1, 6) if q == 0 else rng.randrange(1, T + 1) for q in range(P) for _ in range(K)]
    )
    lengths[K] = T  # the batch's width
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    response = torch.randint(2, 300, (P * K, T), generator=g) * mask.long()
    return {
        "prompt_ids": [prompts[q] for q in range(P) for _ in range(K)],
        "response": response,
        "mask": mask,
        "sampler_logprobs": -torch.rand(P * K, T, generator=g) * mask,
        "rewards": torch.tensor([float((j + q) % 2) for q in range(P) for j in range(K)], dtype=torch.float64),
        "lengths": lengths,
        "group_ids": torch.arange(P * K) // K,
    }


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return build_tiny_qwen2(cfg, 320, {"<|im_end|>": 1, "<|endoftext|>": 0}).float()


def _cfg(**kw) -> TrainConfig:
    base = dict(
        prompts_per_step=P,
        answers_per_prompt=K,
        mini_batch_prompts=2,
        micro_batch_size=3,
        max_new_tokens=T,
        lr=1e-3,
        warmup_steps=1,
        tracking=False,
    )
    return TrainConfig(**{**base, **kw})


def _trained(cfg: TrainConfig, algo: str, batch: dict):
    """The gradients of each optimizer step (before AdamW, whose first step divides by the gradient's size and so
    magnifies rounding on near-zero entries), the weights after, and the metrics."""
    model = _model()
    engine = TorchEngine(model, cfg)
    grads, step = [], engine.step

    def recording_step():
        grads.append({k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None})
        return step()

    engine.step = recording_step
    metrics = update(engine, copy.deepcopy(batch), algo, {}, cfg, 0, seed=3, step=0)
    return grads, model.state_dict(), metrics


def test_balanced_partition_covers_every_item_once_and_balances():
    # by hand: 8|7 and 6|5 differ by 1; 4 goes against 8|7's larger side ({7,4} vs {8}, 3 apart); that pairs with
    # 6|5, larger side to smaller: {7,4,5} = 16 vs {8,6} = 14
    assert balanced_partition([8, 7, 6, 5, 4], 2) == [[1, 3, 4], [0, 2]]
    rng = random.Random(1)
    for _ in range(50):
        sizes = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 40))]
        k = rng.randrange(1, 9)
        parts = balanced_partition(sizes, k)
        assert len(parts) == k and sorted(i for p in parts for i in p) == list(range(len(sizes)))
        sums = [sum(sizes[i] for i in p) for p in parts]
        assert sums == sorted(sums, reverse=True) and all(p == sorted(p) for p in parts)
        assert sums[0] - sums[-1] <= max(sizes)  # the differencing method's bound
        if k <= len(sizes):
            assert all(parts)
    assert balanced_partition([3], 3) == [[0], [], []]
    with pytest.raises(ValueError, match="k must be"):
        balanced_partition([1, 2], 0)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("budget", [24, 60])
def test_token_plan_splits_each_share_by_its_tokens_alike_on_every_rank(world, budget):
    batch = _batch()
    cfg = _cfg(micro_batch_tokens=budget)
    seq = seq_lengths(batch).tolist()
    plans = [plan_minibatches(batch, cfg, 3, 0, _Dist(r, world)) for r in range(world)]
    minis = plans[0][0]
    for m, rows in enumerate(minis):
        counts = {len(plan[m]) for _, plan in plans}
        expect = max(math.ceil(sum(seq[i] for i in rows[r::world]) / budget) for r in range(world))
        questions = max(len(set(batch["group_ids"][rows[r::world]].tolist())) for r in range(world))
        # every rank the same number of micro-batches: the largest need, at most the most questions a rank holds
        assert counts == {max(1, min(expect, questions))}
        assert all(any(plan[m][j] for _, plan in plans) for j in range(counts.pop()))  # none empty everywhere
        got = sorted(i for _, plan in plans for idx in plan[m] for i in idx)
        assert got == sorted(rows)  # each row once, on the rank whose share it is
        for r, (_, plan) in enumerate(plans):
            assert sorted(i for idx in plan[m] for i in idx) == sorted(rows[r::world])
            for idx in plan[m]:  # normalizer mini_batch: a question's answers (in this share) stay together
                share = set(rows[r::world])
                qs = set(batch["group_ids"][idx].tolist()) if idx else set()
                assert {i for i in share if int(batch["group_ids"][i]) in qs} == set(idx)


def test_token_plan_with_micro_batch_normalizer_balances_answers_as_verl():
    """normalizer micro_batch (the presets): single answers are balanced, as verl's rearrange_micro_batches."""
    batch = _batch()
    cfg = _cfg(micro_batch_tokens=60, normalizer="micro_batch")
    seq = seq_lengths(batch).tolist()
    minis, plan = plan_minibatches(batch, cfg, 3, 0, _Dist())
    for rows, micros in zip(minis, plan):
        k = max(1, math.ceil(sum(seq[i] for i in rows) / 60))
        assert micros == [sorted(rows[j] for j in part) for part in balanced_partition([seq[i] for i in rows], k)]


@pytest.mark.parametrize("algo", ["nft", "grpo", "dapo", "dr_grpo", "rft"])
def test_token_micro_batches_cut_to_their_answers_equal_the_padded_update(algo):
    """normalizer mini_batch: other splits and widths, the same step (to 1e-6); micro_batch: the same single
    micro-batch per mini-batch cut to its own width, the same step (Dr.GRPO's denominator keeps the batch's width)."""
    batch = _batch()
    for normalizer, padded_kw, tokens in (
        ("mini_batch", {"micro_batch_size": 3}, 40),
        ("micro_batch", {"micro_batch_size": 2 * K}, 10_000),
    ):
        ga, a, ma = _trained(_cfg(normalizer=normalizer, **padded_kw), algo, batch)
        gb, b, mb = _trained(_cfg(normalizer=normalizer, micro_batch_tokens=tokens), algo, batch)
        assert len(ga) == len(gb) == P // 2
        scale = max(float(g.abs().max()) for step in ga for g in step.values())
        assert scale > 1e-3, "no gradient: nothing compared"
        diff = max(float((x[k] - y[k]).abs().max()) for x, y in zip(ga, gb) for k in x)
        assert diff <= 1e-6, f"{algo} ({normalizer}): token micro-batches' gradients differ by {diff:.1e}"
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5  # after AdamW (lr 1e-3)
        assert mb["loss/total"] == pytest.approx(ma["loss/total"], abs=1e-6)
        assert mb["train/tokens"] == ma["train/tokens"]


def test_token_micro_batches_cut_the_padding():
    """Each micro-batch runs as passes of like answer lengths within the budget, each as wide as its longest answer:
    the padded plan runs P x K x T answer positions, the token plan far fewer, and never fewer than the answers'."""
    from nft.train.plan import answer_passes

    batch = _batch()
    budget = 40
    _, plan = plan_minibatches(batch, _cfg(micro_batch_tokens=budget), 3, 0, _Dist())
    L, seq = batch["lengths"], seq_lengths(batch)
    cells = 0
    for micros in plan:
        for idx in micros:
            passes = answer_passes(batch, idx, budget)
            assert sorted(i for p in passes for i in p) == sorted(idx)
            for p in (p for p in passes if p):
                w = int(L[p].max()) + int((seq[p] - L[p]).max())
                assert len(p) == 1 or len(p) * w <= budget
                cells += len(p) * int(L[p].max())
    assert int(L.sum()) <= cells < 0.75 * P * K * T


def test_micro_batch_tokens_below_the_answer_limit_is_refused():
    with pytest.raises(ValueError, match="train.micro_batch_tokens"):
        _cfg(micro_batch_tokens=T - 1)
    with pytest.raises(ValueError, match="train.micro_batch_tokens"):
        _cfg(micro_batch_tokens=-1)


@pytest.mark.parametrize("preset, tokens", [("paper-7b", 512 + 3584), ("paper-32b", 2048 + 14336)])
def test_paper_presets_split_by_the_official_token_budget(preset, tokens):
    """train_7B.sh / train_32B.sh: use_dynamic_bsz with ppo_max_token_len_per_gpu = max prompt + max response."""
    from pathlib import Path

    import yaml

    train = yaml.safe_load((Path(__file__).parents[2] / "experiments" / f"{preset}.yaml").read_text())["train"]
    assert (
        train["micro_batch_tokens"] == tokens
        and TrainConfig(
            **{
                k: v
                for k, v in train.items()
                if k
                in (
                    "prompts_per_step",
                    "answers_per_prompt",
                    "mini_batch_prompts",
                    "micro_batch_tokens",
                    "max_new_tokens",
                )
            }
        ).micro_batch_tokens
        == tokens
    )


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_runs_as_many_passes_per_micro_batch(world):
    """Under a sharded model each forward and backward is a collective: the ranks' pass lists must line up (empty
    passes fill in), and each rank's passes hold exactly its share."""
    from nft.train.plan import forward_passes

    batch = _batch()
    cfg = _cfg(micro_batch_tokens=40)  # a budget where some ranks run fewer passes than others (2 and 3 ranks)
    plans = [plan_minibatches(batch, cfg, 3, 0, _Dist(r, world))[1] for r in range(world)]
    runs = [(plans[r], forward_passes(batch, plans, cfg, r)) for r in range(world)]
    assert len({tuple(len(p) for p in passes) for _, passes in runs}) == 1
    assert any(not part for _, passes in runs for mini in passes for _, part in mini)  # some ranks had to wait
    for plan, passes in runs:
        for micros, mini in zip(plan, passes):
            assert sorted(i for _, part in mini for i in part) == sorted(i for idx in micros for i in idx)
            assert {tuple(idx) for idx, _ in mini} == {tuple(idx) for idx in micros}
