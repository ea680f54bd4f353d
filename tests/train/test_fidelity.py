"""The official code's behaviours the paper presets switch on (issue "[order 4]"), each reproduced on a hand-built
case whose numbers are computed here independently: the loss scale across ranks, RFT as NFT with neg_weight 0,
the per-micro-batch token mean, warm-up in rollout steps, dynamic sampling's generation batches and its error when
short, truncated answers graded, per-set graders and validation k, and the strict boxed grader."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from nft.algorithms import policy_loss
from nft.config import load_study
from nft.reward import GRADERS, grade_dapo_strict
from nft.rollout.base import Rollout
from nft.train.config import TrainConfig
from nft.train.engines import DeepSpeedEngine, lr_factor
from nft.train.rollout import collect_rollout
from nft.train.seeds import Cursor
from nft.train.validation import validate
from tests.conftest import REPO
from tests.train.fakes import BoxedOnePool, ChatTokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Loss scale across data-parallel ranks
# ---------------------------------------------------------------------------------------------------------------------
class _DS:
    def __init__(self):
        self.losses = []

    def set_gradient_accumulation_boundary(self, last):
        pass

    def backward(self, loss, scale_wrt_gas=True):
        self.losses.append(float(loss))


@pytest.mark.parametrize("reduce, factor", [("sum", 4.0), ("mean", 1.0)])
def test_dp_reduce(reduce, factor):
    """DeepSpeed averages the ranks' gradients. ``sum``: each rank's share times the world size, so the average is the
    one-process gradient. ``mean`` (official): the share as is, so the gradient is the one-process one / world: with
    NFT's token sum / 1000 that is the official effective 1000 x dp (dp_actor.py + FSDP's mean)."""
    eng = DeepSpeedEngine.__new__(DeepSpeedEngine)
    eng.ds, eng.dist, eng.cfg = _DS(), SimpleNamespace(world=4), TrainConfig(dp_reduce=reduce)
    tokens = torch.tensor([120.0, 80.0, 100.0, 60.0])  # each rank's share: its token sum / 1000
    for share in tokens / 1000:
        eng.backward(share)
    # what the optimizer sees after DeepSpeed's average over the 4 ranks
    effective = sum(eng.ds.losses) / 4
    assert effective == pytest.approx(float(tokens.sum()) / (1000 if reduce == "sum" else 4000))
    assert eng.ds.losses[0] == pytest.approx(0.12 * factor)


@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_reference_dp_gives_the_official_world_sizes_gradient_on_any_number_of_processes(world):
    """``reference_dp: 32`` (the 7B run's 4 x 8 GPUs): the same 64 answers' token sums / 1000, split over ``world``
    processes and averaged as DeepSpeed averages, give the official gradient, sum / 1000 / 32."""
    from nft.train.engines import TorchEngine, loss_factor

    cfg = TrainConfig(dp_reduce="mean", reference_dp=32)
    tokens = torch.arange(1.0, 65.0) * 10
    shares = [tokens[r::world].sum() / 1000 for r in range(world)]
    if world == 1:
        eng = TorchEngine(torch.nn.Linear(1, 1), cfg)
        w = torch.ones((), requires_grad=True)
        eng.backward(w * shares[0])
        effective = float(w.grad)
    else:
        eng = DeepSpeedEngine.__new__(DeepSpeedEngine)
        eng.ds, eng.dist, eng.cfg = _DS(), SimpleNamespace(world=world), cfg
        for share in shares:
            eng.backward(share)
        effective = sum(eng.ds.losses) / world
    assert effective == pytest.approx(float(tokens.sum()) / 1000 / 32, rel=1e-6)
    assert loss_factor(TrainConfig(dp_reduce="mean"), world) == 1.0  # without it: the official code on `world`
    with pytest.raises(ValueError, match="train.reference_dp"):
        TrainConfig(reference_dp=32)  # dp_reduce sum: nothing to rescale


# ---------------------------------------------------------------------------------------------------------------------
# RFT as the official code runs it
# ---------------------------------------------------------------------------------------------------------------------
def test_official_rft_is_nft_without_its_negative_term():
    """train_7B.sh's RFT = NFT with neg_weight 0: -(1 - r) log R on the positives of mixed groups, token sum / 1000;
    its gradient differs from plain RFT's (every positive weighted 1) by the question weight 1 - r-hat."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(8, 5, generator=g)).requires_grad_(True)
    old, mask = logp.detach() - 0.05 * torch.rand(8, 5, generator=g), torch.ones(8, 5)
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])  # group rates 1/4 and 3/4
    gids = torch.tensor([0] * 4 + [1] * 4)
    loss, _ = policy_loss("nft", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, neg_weight=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    w = torch.tensor([0.75] * 4 + [0.25] * 4)[:, None]  # omega = 1 - r-hat
    expected = (-w * rewards[:, None] / 1000).expand(8, 5)  # d(-w r log R)/d logp, log R = logp - old
    assert torch.allclose(grad, expected, atol=1e-9)
    cfg = load_study(REPO / "experiments" / "paper-7b.yaml")
    algo, train = cfg["plan"].arm("rft", cfg["train"])
    assert algo == "nft" and train.loss["nft"]["neg_weight"] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# DAPO's token mean per micro-batch
# ---------------------------------------------------------------------------------------------------------------------
def test_micro_batch_normalizer_is_the_sum_of_micro_token_means(monkeypatch):
    """train.normalizer micro_batch: each micro-batch is reduced by its own token count and the losses are summed
    (verl's token mean in the official loop); the default divides every micro-batch by the mini-batch's count."""
    import nft.train.update as upd

    seen = []
    real = upd.policy_loss

    def spy(name, **kw):
        seen.append(kw["normalizer"])
        return real(name, **kw)

    monkeypatch.setattr(upd, "policy_loss", spy)

    class _Eng:
        dist = SimpleNamespace(rank=0, world=1)
        discards_early = True

        def __init__(self):
            self.model = torch.nn.Linear(1, 1)
            self.total = 0.0

        def backward(self, loss, last=True):
            self.total += float(loss)

        def step(self):
            return 0.0

    def fake_logprobs(model, prompts, response, mask, pad, temp, with_entropy=False, shared_prefix=True, chunk_mb=0.0):
        lp = -0.1 * torch.arange(1, response.numel() + 1, dtype=torch.float).reshape(response.shape) / response.numel()
        return (lp, torch.zeros_like(lp)) if with_entropy else (lp, None)

    monkeypatch.setattr(upd, "response_logprobs", fake_logprobs)
    lengths = torch.tensor([3, 1, 2, 2])
    mask = (torch.arange(3)[None] < lengths[:, None]).float()
    batch = {
        "prompt_ids": [[1]] * 4,
        "response": torch.ones(4, 3, dtype=torch.long),
        "mask": mask,
        "sampler_logprobs": torch.zeros(4, 3),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
        "lengths": lengths,
        "group_ids": torch.tensor([0, 0, 0, 0]),
    }
    out = {}
    for mode in ("mini_batch", "micro_batch"):
        seen.clear()
        eng = _Eng()
        cfg = TrainConfig(
            prompts_per_step=1, answers_per_prompt=4, mini_batch_prompts=1, micro_batch_size=2, normalizer=mode
        )
        passes = [([0, 1], [0, 1]), ([2, 3], [2, 3])]  # (micro-batch, its forward pass): micro-batches of 2
        step = upd._Step(
            eng,
            batch,
            torch.zeros(4, 3),
            {"group_rate": torch.full((4,), 0.5), "group_std": torch.full((4,), 0.5)},
            "dapo",
            upd.make_params("dapo"),
            cfg,
            0,
            False,
            "dynamic",
            upd.UpdateStats(),
        )
        upd._train_minibatch(step, [0, 1, 2, 3], passes, False)
        out[mode] = list(seen)
    assert out["mini_batch"] == [8.0, 8.0]  # the mini-batch's 8 response tokens, for both micro-batches
    assert out["micro_batch"] == [None, None]  # each micro-batch's own count (4 and 4 tokens here)


# ---------------------------------------------------------------------------------------------------------------------
# Warm-up in rollout steps
# ---------------------------------------------------------------------------------------------------------------------
def test_warmup_in_rollout_steps():
    """The paper preset: 10 warm-up rollout steps of 512 / 32 = 16 optimizer steps; verl's constant schedule with
    warmup is stepped once per rollout step, so rollout step k trains at k / 10 (rollout step 0 at lr 0)."""
    f = lr_factor(TrainConfig(prompts_per_step=512, mini_batch_prompts=32, warmup_steps=10, warmup_unit="rollout"))
    assert [f(s) for s in (0, 15, 16, 31, 32, 159, 160, 1000)] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.9, 1.0, 1.0]
    g = lr_factor(TrainConfig(prompts_per_step=512, mini_batch_prompts=32, warmup_steps=10))
    assert [g(s) for s in (0, 8, 9, 10)] == [0.1, 0.9, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# Dynamic sampling and grading
# ---------------------------------------------------------------------------------------------------------------------
class _Sampler:
    """K answers per question: the questions named 'mixed' get one right answer of K, the others none; the answers
    to 'cut' questions are cut at the length limit (right, but unfinished)."""

    def __init__(self):
        self.asked = []

    def sample(self, prompts, n, **kw):
        self.asked.append(len(prompts))
        B = len(prompts) * n
        texts = [
            ("\\boxed{1}" if (p.startswith("mixed") or p.startswith("cut")) and j == 0 else "x")
            for p in prompts
            for j in range(n)
        ]
        finished = torch.tensor([not p.startswith("cut") for p in prompts for _ in range(n)])
        return Rollout(
            prompt_ids=[[1]] * B,
            response=torch.ones(B, 2, dtype=torch.long),
            mask=torch.ones(B, 2),
            logprobs=-torch.ones(B, 2),
            finished=finished,
            texts=texts,
            entropy=torch.zeros(B, 2),
        )

    def shard(self, dist):
        return 0, 1, True


def _problems(names):
    return [SimpleNamespace(question=n, answer="1") for n in names]


def test_generation_batches_of_three_p_keep_the_first_p_mixed_groups():
    probs = _problems(["mixed0", "none", "mixed1", "none", "mixed2", "none"])
    cfg = TrainConfig(
        prompts_per_step=2,
        answers_per_prompt=2,
        mini_batch_prompts=1,
        gen_batch_prompts=6,
        max_num_gen_batches=10,
        short_batch="error",
    )
    sampler = _Sampler()
    batch, m = collect_rollout(
        sampler, ChatTokenizer(), probs, Cursor(6, 0, pos=0), BoxedOnePool(), cfg, "dynamic", 0, 0
    )
    cursor = Cursor(6, 0)
    order = [probs[i].question for i in cursor.take(6)]
    assert sampler.asked == [6] and m["rollout/gen_batches"] == 1.0  # one batch of 3 x P questions
    assert m["rollout/groups_kept"] == 2 and len(batch["rewards"]) == 4
    first_two = [q for q in order if q.startswith("mixed")][:2]
    assert batch["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0] and len(first_two) == 2


def test_short_dynamic_batch_is_an_error_when_asked():
    probs = _problems(["mixed0", "none", "none", "none"])
    cfg = TrainConfig(
        prompts_per_step=2, answers_per_prompt=2, mini_batch_prompts=1, max_num_gen_batches=2, short_batch="error"
    )
    with pytest.raises(ValueError, match="1 of 2 mixed groups after 2 generation batches"):
        collect_rollout(_Sampler(), ChatTokenizer(), probs, Cursor(4, 0), BoxedOnePool(), cfg, "dynamic", 0, 0)
    cfg = dataclasses.replace(cfg, short_batch="train")
    batch, m = collect_rollout(_Sampler(), ChatTokenizer(), probs, Cursor(4, 0), BoxedOnePool(), cfg, "dynamic", 0, 0)
    assert m["rollout/groups_kept"] == 1.0


@pytest.mark.parametrize("graded, reward", [(False, 0.0), (True, 1.0)])
def test_truncated_answers_graded_when_asked(graded, reward):
    cfg = TrainConfig(prompts_per_step=1, answers_per_prompt=2, mini_batch_prompts=1, grade_truncated=graded)
    batch, _ = collect_rollout(
        _Sampler(), ChatTokenizer(), _problems(["cut"]), Cursor(1, 0), BoxedOnePool(), cfg, "all", 0, 0
    )
    assert batch["rewards"].tolist() == [reward, 0.0]


def test_validation_k_and_grader_per_set():
    class _Grading:
        def __init__(self, name):
            self.name, self.calls = name, 0

        def grade_many(self, texts, golds, only=None):
            from nft.reward import GradeStats

            self.calls += 1
            return [t == "\\boxed{1}" for t in texts], GradeStats()

    pools = {"math_verify": _Grading("math_verify"), "dapo_strict": _Grading("dapo_strict")}
    cfg = TrainConfig(
        val_k=1,
        val_k_per_benchmark={"amc23": 4},
        grader_per_set={"amc23": "dapo_strict"},
        val_limit=0,
        max_new_tokens=4,
    )
    sets = {"math500": _problems(["mixed0", "none"]), "amc23": _problems(["mixed1"])}
    out = validate(_Sampler(), ChatTokenizer(), sets, pools, cfg, 0)
    assert out["val/math500/avg@1"] == 0.5 and out["val/amc23/avg@4"] == 0.25
    assert out["val/mean/avg@1"] == pytest.approx((0.5 + 0.25) / 2)
    assert pools["math_verify"].calls == 1 and pools["dapo_strict"].calls == 1
    with pytest.raises(ValueError, match="train.grader_per_set.amc23: grader: unknown"):
        TrainConfig(grader_per_set={"amc23": "strict"})


@pytest.mark.parametrize(
    "response, ok",
    [
        ("so the answer is \\boxed{34}.", True),
        ("\\boxed{34} or rather \\boxed{35}", False),  # the last box counts
        ("\\boxed{ 34 }", False),  # no trimming
        ("\\boxed {34}", False),  # not the literal \boxed{
        ("\\boxed{34.0}", False),  # no normalisation
        ("\\boxed{34", False),  # unclosed
        ("\\boxed{34}" + "x" * 90, True),  # the box within the last 100 characters
        ("\\boxed{34}" + "x" * 91, False),  # its opening cut by the window
        ("\\boxed{\\frac{1}{2}}", False),  # nested braces matched: the answer is \frac{1}{2} != 34
    ],
)
def test_strict_boxed_grader(response, ok):
    assert grade_dapo_strict(response, "34") is ok
    assert GRADERS["dapo_strict"].in_process(response, "34") is ok  # bounded string work: no worker process
    assert grade_dapo_strict("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}") and not grade_dapo_strict(
        "\\boxed{\\frac12}", "\\frac{1}{2}"
    )


def test_overlong_penalty_on_the_official_score_scale():
    """The official 32B DAPO run adds the penalty to -1/+1 scores; half the penalty on 0/1 rewards
    (``overlong_scale: official``) gives its gradient to 1e-6, the penalty as it is (``unit``) does not."""
    torch.manual_seed(0)
    r = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.float64)
    pen = torch.tensor([0.0, -0.3, -1.0, 0.0, -0.5, 0.0, 0.0, -0.2], dtype=torch.float64)
    base = torch.randn(8, 5)
    old = base + 0.05 * torch.randn(8, 5)

    def grad(rewards):
        logp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(
            "dapo",
            logp=logp,
            old_logp=old,
            mask=torch.ones(8, 5),
            rewards=rewards,
            group_ids=torch.arange(2).repeat_interleave(4),
        )
        loss.backward()
        return logp.grad

    official = grad(2 * r - 1 + pen)
    assert torch.allclose(grad(r + 0.5 * pen), official, atol=1e-6, rtol=0)
    assert (grad(r + pen) - official).abs().max() > 1e-2
    assert TrainConfig(overlong_scale="official").overlong_scale == "official"
    with pytest.raises(ValueError, match="train.overlong_scale"):
        TrainConfig(overlong_scale="pm1")


def test_decay_1d_puts_norms_and_biases_under_weight_decay():
    """``decay_1d`` (the official AdamW on every parameter): the 1-D parameters join the decayed group."""
    from nft.train.engines import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = make_optimizer(model, TrainConfig()).param_groups
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    groups = make_optimizer(model, TrainConfig(decay_1d=True)).param_groups
    assert [len(g["params"]) for g in groups] == [4] and groups[0]["weight_decay"] == 0.1


def test_max_prompt_tokens_drops_the_longer_questions():
    """``max_prompt_tokens`` (verl's ``filter_overlong_prompts``): questions whose rendered prompt is longer are
    dropped and counted as skipped; the set keeps its name and gets the hash of what it holds."""
    from nft.data.problems import Item, ProblemSet
    from nft.data.prompts import within_prompt_tokens

    class WordTokenizer(ChatTokenizer):
        def __call__(self, text, **kw):
            return {"input_ids": text.split()}

    qs = ProblemSet([Item(str(n), " ".join(["w"] * n), "1") for n in (3, 8, 5, 12)], "dapo-math-17k")
    kept = within_prompt_tokens(qs, WordTokenizer(), 5)
    assert [len(p.question.split()) for p in kept] == [3, 5] and kept.skipped == 2 and kept.name == "dapo-math-17k"
    assert kept.hash != qs.hash and within_prompt_tokens(qs, WordTokenizer(), 0) is qs


def test_stop_tokens_eos_is_the_checkpoints_eos_alone(tmp_path):
    """``stop_tokens: eos`` (the official rollout, vLLM's default): the generation config's eos ids alone; ``chat``
    adds Qwen's chat-turn and end-of-text tokens."""
    from nft.modeling import stop_token_ids
    from nft.rollout.vllm_sampler import _generation_eos

    class Tok:
        eos_token_id = 7

        def get_vocab(self):
            return {"<|im_end|>": 5, "<|endoftext|>": 6}

    assert stop_token_ids(Tok()) == [5, 6, 7]
    assert stop_token_ids(Tok(), "eos", [6]) == [6] and stop_token_ids(Tok(), "eos") == [7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [6, 5]}')
    assert stop_token_ids(Tok(), "eos", _generation_eos(str(tmp_path))) == [5, 6]
    assert _generation_eos(str(tmp_path / "none")) is None
    with pytest.raises(ValueError, match="stop_tokens"):
        stop_token_ids(Tok(), "all")


# ---------------------------------------------------------------------------------------------------------------------
# NFT's token loss, transcribed from the official actor
# ---------------------------------------------------------------------------------------------------------------------
def _official_clamp_preserve_grad(x, min_val=None, max_val=None):
    """NVlabs/NFT dp_actor.py:53-55."""
    clipped = torch.clamp(x, min=min_val, max=max_val)
    return x + (clipped - x).detach()


def _official_nft_token_loss(log_prob, old_log_prob, response_mask, correct_mask, correct_rate, neg_weight=1.0):
    """NVlabs/NFT dp_actor.py:322-346 and 371-373 (ratio_type token, clamp_negative 1.0, clamp_positive 0.0,
    normalize 1: train_7B.sh:52-58); correct_rate per row, broadcast over tokens as the official batch carries it."""
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp((negative_approx_kl).clamp(max=10.0))
    correct_rate = torch.clamp(correct_rate, min=0.02, max=0.98)
    negative_rate = 1.0 - correct_rate
    proxy = 1.0 - correct_rate * ratio
    norm = 1.0 - correct_rate * 1.0
    proxy = proxy / norm
    negative_loss = -torch.log(_official_clamp_preserve_grad(proxy, min_val=abs(1.0)))
    positive_loss = -torch.log(_official_clamp_preserve_grad(ratio, min_val=0.0))
    pg_losses = negative_loss * (1.0 - correct_mask[:, None]) * neg_weight + correct_mask[:, None] * positive_loss
    pg_losses = pg_losses * negative_rate
    pg_loss = torch.sum(pg_losses * response_mask, dim=1) / 1000.0
    return torch.sum(pg_loss)


@pytest.mark.parametrize("neg_weight", [1.0, 0.0])
def test_nft_token_loss_equals_the_official_actors_at_extreme_ratios(neg_weight):
    """The presets' NFT (eps 1.0, omega 1 - r-hat) and RFT (neg_weight 0): value and gradient equal the official
    actor's on ratios from e^-12 to e^12 (its clamp at e^10, the negative term's clip at 1 with the gradient kept),
    with groups of every correct rate, uniform groups (clamped to 0.02 / 0.98) and padding."""
    g = torch.Generator().manual_seed(3)
    rows, T = 16, 7
    old = -3 * torch.rand(rows, T, generator=g)
    logp = (
        old + torch.linspace(-12, 12, rows * T).reshape(rows, T)[torch.randperm(rows, generator=g)]
    ).requires_grad_()
    mask = (torch.rand(rows, T, generator=g) > 0.2).float()
    mask[:, 0] = 1
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0])  # rates 1/4, 3/4, 1, 0
    gids = torch.arange(rows) // 4
    rate = torch.zeros(rows).index_add_(0, gids, rewards) / 4
    ours, _ = policy_loss(
        "nft", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, eps=1.0, neg_weight=neg_weight
    )
    theirs = _official_nft_token_loss(logp, old, mask, rewards, rate[gids][:, None], neg_weight=neg_weight)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-6, atol=1e-12)
    assert (logp - old).abs().max() > 10  # the clamp at e^10 is reached
