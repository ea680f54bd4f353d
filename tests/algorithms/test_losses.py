"""The algorithm core against slow loops written straight from the formulas, Proposition 4.2, micro-batch exactness
and edge cases. Everything in float64."""

from __future__ import annotations

import math

import pytest
import torch

from nft.algorithms import (
    AGG_MODES,
    LOSSES,
    agg_loss,
    batch_context,
    group_stats,
    keep_rows,
    overlong_penalty,
    policy_loss,
)


@pytest.fixture(autouse=True)
def float64():
    """Everything here in float64; restored afterwards so that other test modules are not affected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------------------------------
# Random batches
# ----------------------------------------------------------------------------------------------------------------------
def make_batch(seed: int, n_groups: int, group_size: int, T: int = 7, spread: float = 0.3, binary: bool = True):
    g = torch.Generator().manual_seed(seed)
    B = n_groups * group_size
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    logp = (old + spread * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    if binary:
        rewards = (torch.rand(B, generator=g) < 0.5).double()
    else:
        rewards = torch.rand(B, generator=g)
    group_ids = torch.arange(n_groups).repeat_interleave(group_size)
    # make sure some groups are mixed, one all-correct and one all-wrong when there are enough groups
    if binary and n_groups >= 3:
        rewards[:group_size] = 1.0
        rewards[group_size : 2 * group_size] = 0.0
        rewards[2 * group_size] = 1.0
        rewards[2 * group_size + 1] = 0.0
    return logp, old, mask, rewards, group_ids


# ----------------------------------------------------------------------------------------------------------------------
# Slow references: loops over rows and tokens, written from the equations
# ----------------------------------------------------------------------------------------------------------------------
def ref_group_stats(rewards, group_ids, std):
    rows = rewards.tolist()
    gid = group_ids.tolist()
    means, stds = [], []
    for i in range(len(rows)):
        members = [rows[j] for j in range(len(rows)) if gid[j] == gid[i]]
        m = sum(members) / len(members)
        ss = sum((x - m) ** 2 for x in members)
        d = len(members) if std == "population" else max(len(members) - 1, 1)
        means.append(m)
        stds.append(math.sqrt(ss / d))
    return means, stds


def ref_reduce(per_token, mask, mode, const):
    """per_token: list of lists of scalar tensors (None where masked)."""
    B = len(per_token)
    T = len(mask[0])
    total = torch.zeros(())
    rows = 0
    tokens = 0
    for i in range(B):
        n_i = sum(1 for t in range(T) if mask[i][t] > 0)
        if n_i == 0:
            continue
        rows += 1
        tokens += n_i
        row_sum = sum((per_token[i][t] for t in range(T) if mask[i][t] > 0), torch.zeros(()))
        total = total + (row_sum / n_i if mode == "seq-mean-token-mean" else row_sum)
    if mode == "token-mean":
        n = tokens
    elif mode == "seq-mean-token-mean":
        n = rows
    elif mode == "seq-mean-token-sum-norm":
        n = rows * (T if const is None else const)
    else:
        n = 1000.0 if const is None else const
    return total / (n if n > 0 else 1.0)


def ref_loss(name, logp, old, mask, rewards, group_ids, **kw):
    """Slow per-token reference for every registered loss."""
    B, T = logp.shape
    m = mask.tolist()
    r = rewards.tolist()
    if name in ("nft", "rft"):
        eps = kw.get("eps", 1.0)
        omega = kw.get("omega", "one_minus_r")
        neg_w = kw.get("neg_weight", 1.0)
        ratio_kind = kw.get("ratio", "token")
        means, _ = ref_group_stats(rewards, group_ids, "population")
        per = [[None] * T for _ in range(B)]
        for i in range(B):
            rate = min(max(means[i], 0.02), 0.98)
            if name == "rft" or omega == "one":
                w = 1.0
            elif omega == "one_minus_r":
                w = 1.0 - rate
            else:
                w = math.sqrt((1.0 - rate) / rate)
            n_i = sum(1 for t in range(T) if m[i][t] > 0)
            if ratio_kind == "sequence":
                s = sum((logp[i, t] - old[i, t] for t in range(T) if m[i][t] > 0), torch.zeros(()))
                seq_lr = torch.clamp(s, max=10.0)
            for t in range(T):
                if m[i][t] <= 0:
                    continue
                if name == "rft" and r[i] < 0.5:
                    continue
                lr = seq_lr if ratio_kind == "sequence" else torch.clamp(logp[i, t] - old[i, t], max=10.0)
                R = torch.exp(lr)
                if r[i] > 0.5:
                    val = -lr
                else:
                    x = (1 - rate * R) / (1 - rate)
                    clipped = x if x.item() >= eps else x - x.detach() + eps  # value eps, gradient of x
                    val = -neg_w * torch.log(clipped)
                if name == "nft":
                    val = w * val
                if ratio_kind == "sequence":
                    val = val / n_i
                per[i][t] = val
        mode = kw.get("agg", "token-sum")
        eff = [[m[i][t] if (name != "rft" or r[i] > 0.5) else 0.0 for t in range(T)] for i in range(B)]
        return ref_reduce(per, eff, mode, kw.get("agg_const"))
    # GRPO family
    defaults = {
        "grpo": dict(clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean", norm=True),
        "dr_grpo": dict(clip_low=0.2, clip_high=0.2, agg="seq-mean-token-sum-norm", norm=False),
        "dapo": dict(clip_low=0.2, clip_high=0.28, agg="token-mean", norm=True),
    }[name]
    cl = kw.get("clip_low", defaults["clip_low"])
    ch = kw.get("clip_high", defaults["clip_high"])
    std_kind = kw.get("std", "unbiased")
    std_eps = kw.get("std_eps", 1e-6)
    means, stds = ref_group_stats(rewards, group_ids, std_kind)
    per = [[None] * T for _ in range(B)]
    for i in range(B):
        A = r[i] - means[i]
        if defaults["norm"]:
            A = A / (stds[i] + std_eps)
        for t in range(T):
            if m[i][t] <= 0:
                continue
            R = torch.exp(logp[i, t] - old[i, t])
            per[i][t] = torch.maximum(-A * R, -A * torch.clamp(R, 1 - cl, 1 + ch))
    return ref_reduce(per, m, kw.get("agg", defaults["agg"]), kw.get("agg_const"))


def loss_and_grad(fn, logp):
    x = logp.detach().clone().requires_grad_(True)
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


CASES = [
    ("nft", {}),
    ("nft", {"omega": "one"}),
    ("nft", {"omega": "sqrt", "eps": 0.5}),
    ("nft", {"neg_weight": 0.7, "eps": 0.9, "agg": "token-mean"}),
    ("nft", {"ratio": "sequence"}),
    ("nft", {"agg": "seq-mean-token-sum-norm", "agg_const": 11.0}),
    ("rft", {}),
    ("rft", {"agg": "seq-mean-token-mean"}),
    ("grpo", {}),
    ("grpo", {"std": "population"}),
    ("dr_grpo", {}),
    ("dapo", {}),
    ("dapo", {"agg": "token-sum", "agg_const": 50.0}),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [2, 4, 5])
@pytest.mark.parametrize("name,kw", CASES)
def test_matches_slow_reference(name, kw, seed, group_size):
    logp, old, mask, rewards, gids = make_batch(seed, n_groups=3, group_size=group_size, spread=0.4)
    fast, g_fast = loss_and_grad(
        lambda x: policy_loss(name, logp=x, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, **kw)[0], logp
    )
    slow, g_slow = loss_and_grad(lambda x: ref_loss(name, x, old, mask, rewards, gids, **kw), logp)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-6), (fast, slow)
    assert torch.allclose(g_fast, g_slow, atol=1e-6, rtol=1e-6)


def test_reference_exercises_the_clips():
    """The random batches above do reach the eps clip of NFT and both PPO clips (else the tests prove little)."""
    logp, old, mask, rewards, gids = make_batch(0, n_groups=3, group_size=4, spread=0.4)
    _, m = policy_loss("nft", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    assert 0 < m["neg_eps_clip_frac"] < 1  # default eps = 1: clipped where R > 1
    _, m = policy_loss("dapo", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0


# ----------------------------------------------------------------------------------------------------------------------
# Proposition 4.2
# ----------------------------------------------------------------------------------------------------------------------
def _mixed_batch(seed, group_size=4, n_groups=4):
    logp, _, mask, rewards, gids = make_batch(seed, n_groups=n_groups, group_size=group_size)
    # every group mixed: 0 < r-hat < 1 (dynamic sampling keeps only those)
    for q in range(n_groups):
        rewards[q * group_size] = 1.0
        rewards[q * group_size + 1] = 0.0
    return logp, mask, rewards, gids


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("agg", ["token-sum", "token-mean", "seq-mean-token-mean"])
def test_prop_4_2_nft_sqrt_equals_grpo_on_policy(seed, agg):
    """R = 1: grad NFT(omega = sqrt((1-r)/r)) == grad GRPO(population std) under the same reduction, factor 1
    (exact with std_eps = 0; the default 1e-6 changes it by < 1e-5 relative)."""
    logp, mask, rewards, gids = _mixed_batch(seed)
    common = dict(old_logp=logp.detach(), mask=mask, rewards=rewards, group_ids=gids)
    _, g_nft = loss_and_grad(lambda x: policy_loss("nft", logp=x, omega="sqrt", agg=agg, **common)[0], logp)
    _, g_grpo = loss_and_grad(
        lambda x: policy_loss("grpo", logp=x, std="population", std_eps=0.0, agg=agg, **common)[0], logp
    )
    assert g_nft.abs().max() > 1e-4
    assert torch.allclose(g_nft, g_grpo, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_prop_4_2_nft_one_minus_r_equals_dr_grpo_on_policy(seed):
    """R = 1: grad NFT(omega = 1 - r) == grad Dr.GRPO with the same reduction (factor 1). With their default
    reductions (NFT token-sum / 1000, Dr.GRPO sum / (rows x T)) the factor is rows x T / 1000."""
    logp, mask, rewards, gids = _mixed_batch(seed)
    common = dict(old_logp=logp.detach(), mask=mask, rewards=rewards, group_ids=gids)
    _, g_dr = loss_and_grad(lambda x: policy_loss("dr_grpo", logp=x, **common)[0], logp)
    _, g_same = loss_and_grad(
        lambda x: policy_loss("nft", logp=x, omega="one_minus_r", agg="seq-mean-token-sum-norm", **common)[0], logp
    )
    assert torch.allclose(g_same, g_dr, atol=1e-12, rtol=1e-10)
    _, g_default = loss_and_grad(lambda x: policy_loss("nft", logp=x, **common)[0], logp)
    rows, T = logp.shape
    assert torch.allclose(g_default * (1000.0 / (rows * T)), g_dr, atol=1e-12, rtol=1e-10)


def test_prop_4_2_breaks_off_policy():
    """With R != 1 the gradients differ (NFT's negative term is not a clipped linear surrogate)."""
    logp, mask, rewards, gids = _mixed_batch(0)
    old = logp.detach() + 0.3
    common = dict(old_logp=old, mask=mask, rewards=rewards, group_ids=gids, agg="token-sum")
    _, g_nft = loss_and_grad(lambda x: policy_loss("nft", logp=x, omega="sqrt", **common)[0], logp)
    _, g_grpo = loss_and_grad(lambda x: policy_loss("grpo", logp=x, std="population", std_eps=0.0, **common)[0], logp)
    assert (g_nft - g_grpo).abs().max() > 0.1 * g_grpo.abs().max()


@pytest.mark.parametrize("agg", AGG_MODES)
def test_rft_gradient_is_sft_on_positives(agg):
    logp, mask, rewards, gids = _mixed_batch(1)
    _, g_rft = loss_and_grad(
        lambda x: policy_loss(
            "rft", logp=x, old_logp=logp.detach(), mask=mask, rewards=rewards, group_ids=gids, agg=agg
        )[0],
        logp,
    )
    pos_mask = mask * rewards[:, None]
    _, g_sft = loss_and_grad(lambda x: agg_loss(-x, pos_mask, agg), logp)
    assert torch.allclose(g_rft, g_sft, atol=1e-12)


def test_sft_is_the_cross_entropy_on_the_reference_tokens():
    """The supervised control: with old log-probs of 0 (what the loop passes for a ``reference`` loss) the sft loss
    is F.cross_entropy over the reference tokens (padding ignored), value and gradient."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 5, 7, 11
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0.0
    mask[3, 2:] = 0.0
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, _ = policy_loss(
        "sft", logp=logp, old_logp=torch.zeros_like(logp), mask=mask, rewards=torch.ones(B), group_ids=torch.arange(B)
    )
    (g_ours,) = torch.autograd.grad(loss, logits)
    on = mask > 0
    ce = torch.nn.functional.cross_entropy(logits[on], tokens[on])
    (g_ce,) = torch.autograd.grad(ce, logits)
    assert torch.allclose(loss, ce, atol=1e-12) and torch.allclose(g_ours, g_ce, atol=1e-12)
    assert LOSSES["sft"].reference and not LOSSES["nft"].reference


# ----------------------------------------------------------------------------------------------------------------------
# Micro-batches
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("splits", [[5, 3, 4], [1] * 12, [7, 5]])
def test_micro_batches_add_up_to_the_whole_batch(name, agg, splits):
    """Micro-batches cut across groups; with the mini-batch's context their losses and gradients add up exactly."""
    logp, old, mask, rewards, gids = make_batch(3, n_groups=3, group_size=4, spread=0.4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    logp, old, mask, rewards, gids = logp[perm], old[perm], mask[perm], rewards[perm], gids[perm]
    mask[4] = 0.0  # a row of padding
    kw = dict(agg=agg)
    whole, g_whole = loss_and_grad(
        lambda x: policy_loss(name, logp=x, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, **kw)[0], logp
    )
    ctx = batch_context(name, mask=mask, rewards=rewards, group_ids=gids, **kw)
    x = logp.detach().clone().requires_grad_(True)
    total = torch.zeros(())
    start = 0
    for size in splits:
        sl = slice(start, start + size)
        start += size
        loss, _ = policy_loss(
            name,
            logp=x[sl],
            old_logp=old[sl],
            mask=mask[sl],
            rewards=rewards[sl],
            group_ids=gids[sl],
            group_rate=ctx["group_rate"][sl],
            group_std=ctx["group_std"][sl],
            normalizer=ctx["normalizer"],
            **kw,
        )
        loss.backward()
        total = total + loss.detach()
    assert torch.allclose(total, whole, atol=1e-12)
    assert torch.allclose(x.grad, g_whole, atol=1e-12)


def test_naive_micro_batching_is_wrong():
    """The bug the protocol avoids: averaging per-micro-batch token-means is not the batch's token-mean."""
    logp, old, mask, rewards, gids = make_batch(4, n_groups=3, group_size=4)
    whole, _ = policy_loss("dapo", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    ctx = batch_context("dapo", mask=mask, rewards=rewards, group_ids=gids)
    naive = sum(
        policy_loss(
            "dapo",
            logp=logp[sl],
            old_logp=old[sl],
            mask=mask[sl],
            rewards=rewards[sl],
            group_ids=gids[sl],
            group_rate=ctx["group_rate"][sl],
            group_std=ctx["group_std"][sl],
        )[0]
        / 2
        for sl in (slice(0, 2), slice(2, 12))
    )
    assert not torch.allclose(naive, whole, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_correct_and_all_wrong_groups(name):
    """Uniform groups: GRPO-family advantages are 0 (no gradient); NFT clips r-hat to [0.02, 0.98] (finite loss;
    an all-correct group trains like RFT, an all-wrong group pushes down with a weight ~0.02 / 0.98); RFT ignores the
    all-wrong group."""
    logp, old, mask, _, gids = make_batch(5, n_groups=2, group_size=4)
    rewards = torch.tensor([1.0] * 4 + [0.0] * 4)
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(name, logp=x, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    if name in ("grpo", "dr_grpo", "dapo"):
        assert x.grad.abs().max() == 0
    if name == "rft":
        assert x.grad[4:].abs().max() == 0 and x.grad[:4].abs().max() > 0
    if name == "nft":
        assert x.grad[:4].abs().max() > 0 and x.grad[4:].abs().max() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_mask_gives_zero(name, agg):
    logp, old, _, rewards, gids = make_batch(6, n_groups=2, group_size=3)
    x = logp.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(
        name, logp=x, old_logp=old, mask=torch.zeros_like(logp), rewards=rewards, group_ids=gids, agg=agg
    )
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().max() == 0.0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_values_do_not_leak(name):
    """NaN / inf in padded positions (outside the mask) change nothing."""
    logp, old, mask, rewards, gids = make_batch(7, n_groups=2, group_size=4)
    ref, g_ref = loss_and_grad(
        lambda x: policy_loss(name, logp=x, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)[0], logp
    )
    dirty_logp = torch.where(mask > 0, logp, torch.full_like(logp, float("nan")))
    dirty_old = torch.where(mask > 0, old, torch.full_like(old, float("-inf")))
    got, g_got = loss_and_grad(
        lambda x: policy_loss(name, logp=x, old_logp=dirty_old, mask=mask, rewards=rewards, group_ids=gids)[0],
        dirty_logp,
    )
    assert torch.equal(got, ref)
    assert torch.equal(g_got * mask, g_ref * mask) and torch.isfinite(g_got).all()


@pytest.mark.parametrize("field", ["logp", "old_logp", "rewards"])
def test_non_finite_inputs_raise(field):
    logp, old, mask, rewards, gids = make_batch(8, n_groups=2, group_size=4)
    args = dict(logp=logp.clone(), old_logp=old.clone(), mask=mask, rewards=rewards.clone(), group_ids=gids)
    if field == "rewards":
        args["rewards"][0] = float("nan")
    else:
        args[field][0, 0] = float("inf")
    with pytest.raises(ValueError, match=field):
        policy_loss("nft", **args)


def test_unknown_name_lists_registry():
    logp, old, mask, rewards, gids = make_batch(0, n_groups=1, group_size=2)
    with pytest.raises(ValueError) as err:
        policy_loss("ppo", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    for name in ("nft", "rft", "grpo", "dr_grpo", "dapo"):
        assert name in str(err.value)


def test_unknown_and_bad_hyperparameters_raise():
    logp, old, mask, rewards, gids = make_batch(0, n_groups=1, group_size=2)
    args = dict(logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    with pytest.raises(ValueError, match="clip_hihg"):
        policy_loss("grpo", clip_hihg=0.3, **args)
    with pytest.raises(ValueError, match="omega"):
        policy_loss("nft", omega="half", **args)
    with pytest.raises(ValueError, match="agg"):
        policy_loss("dapo", agg="mean", **args)


def test_shape_mismatch_and_nonbinary_rewards_raise():
    logp, old, mask, rewards, gids = make_batch(0, n_groups=2, group_size=2)
    with pytest.raises(ValueError, match="mask"):
        policy_loss("nft", logp=logp, old_logp=old, mask=mask[:, :-1], rewards=rewards, group_ids=gids)
    with pytest.raises(ValueError, match="rewards"):
        policy_loss("nft", logp=logp, old_logp=old, mask=mask, rewards=rewards * 0.5 + 0.25, group_ids=gids)
    # GRPO family accepts shaped rewards (e.g. with DAPO's overlong penalty)
    loss, _ = policy_loss("dapo", logp=logp, old_logp=old, mask=mask, rewards=rewards - 0.3, group_ids=gids)
    assert torch.isfinite(loss)


def test_loss_parts_add_up():
    logp, old, mask, rewards, gids = make_batch(9, n_groups=3, group_size=4, spread=0.3)
    for name in LOSSES:
        loss, m = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
        assert abs(m["loss_pos"] + m["loss_neg"] - loss.item()) < 1e-12
        assert m["loss"] == loss.item()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def test_group_stats_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    gids = torch.tensor([7, 7, 7, 7, 3, 3])
    mean, pop = group_stats(rewards, gids, std="population")
    _, unb = group_stats(rewards, gids, std="unbiased")
    assert mean.tolist() == [0.5] * 4 + [1.0, 1.0]
    assert torch.allclose(pop, torch.tensor([0.5] * 4 + [0.0, 0.0]))
    assert torch.allclose(unb, torch.tensor([math.sqrt(1 / 3)] * 4 + [0.0, 0.0]))


def test_batch_rules_and_overlong_penalty():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    gids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert keep_rows("dynamic", rewards, gids).tolist() == [False, False, False, False, True, True]
    assert keep_rows("positives", rewards, gids).tolist() == [True, True, False, False, True, False]
    assert keep_rows("all", rewards, gids).all()
    with pytest.raises(ValueError, match="batch_rule"):
        keep_rows("some", rewards, gids)
    pen = overlong_penalty(torch.tensor([10, 12, 16, 20, 25]), max_len=20, buffer=8, penalty=1.0)
    assert torch.allclose(pen.double(), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer=0)


def test_positives_rule_restricts_the_rft_loss_and_normaliser():
    """RFT's loss on a batch with negatives equals its loss on the positive rows alone (one rule, keep_rows)."""
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(6, 5, generator=g)
    mask = torch.ones(6, 5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    # a token mean: the normaliser counts the positives' tokens only (with token-sum it would not matter)
    full, _ = policy_loss(
        "rft", logp=logp, old_logp=logp.detach(), mask=mask, rewards=rewards, group_ids=gids, agg="token-mean"
    )
    pos = keep_rows("positives", rewards, gids)
    only, _ = policy_loss(
        "rft",
        logp=logp[pos],
        old_logp=logp[pos].detach(),
        mask=mask[pos],
        rewards=rewards[pos],
        group_ids=gids[pos],
        agg="token-mean",
    )
    assert torch.allclose(full, only)


def test_batch_rule_is_decided_once_and_the_loss_masks_by_it():
    """train.batch_rule overrides the loss's registered rule, and the loss and its normaliser follow the override
    (RFT under ``all`` counts its negative rows' tokens; under its own ``positives`` it does not)."""
    from nft.algorithms import batch_rule, loss_normalizer, make_params

    assert batch_rule("rft") == "positives" and batch_rule("rft", "auto") == "positives"
    assert batch_rule("rft", "all") == "all" and batch_rule("grpo", "dynamic") == "dynamic"
    with pytest.raises(ValueError, match="train.batch_rule"):
        batch_rule("nft", "some")
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = torch.tensor([1.0, 0.0])
    assert loss_normalizer("rft", mask=mask, rewards=rewards, params=make_params("rft", agg="token-mean")) == 2
    assert (
        loss_normalizer("rft", mask=mask, rewards=rewards, params=make_params("rft", agg="token-mean"), rule="all") == 5
    )
