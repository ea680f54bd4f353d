"""The trainer's shared-prefix log-prob pass equals the packed one (values and gradients) and the sampler's
log-probs; the sampler is seeded."""

import pytest
import torch

from nft.data.prompts import render_prompt
from nft.data.synthetic import SyntheticConfig, build_splits
from nft.modeling import _spreader, load_policy, response_logprobs
from nft.rollout.torch_sampler import TorchSampler


def test_shared_prefix_equals_packed_and_sampler(tiny_study):
    _, _, base = tiny_study
    model, tok = load_policy(str(base))
    problems = build_splits(SyntheticConfig(families=["add"], tiers=["medium"], train_size=50, eval_size=8))["train"]
    sampler = TorchSampler(model, tok)
    ro = sampler.sample([render_prompt(tok, p.question) for p in problems[:5]], 3, max_new_tokens=16, seed=4)
    # the sampler's order (each prompt's answers together: _Spread), and one that mixes rows of different prompts
    for perm in (torch.arange(15), torch.tensor([3, 0, 7, 1, 14, 2, 9, 5, 4, 6, 8, 10, 11, 12, 13])):
        _same_logprobs_and_grads(model, tok, ro, perm)
    again = sampler.sample([render_prompt(tok, p.question) for p in problems[:5]], 3, max_new_tokens=16, seed=4)
    assert torch.equal(again.response, ro.response) and again.texts == ro.texts


def _same_logprobs_and_grads(model, tok, ro, perm):
    prompt_ids = [ro.prompt_ids[i] for i in perm.tolist()]
    response, mask = ro.response[perm], ro.mask[perm]
    grads = []
    for shared in (False, True):
        model.zero_grad()
        lp, ent = response_logprobs(
            model, prompt_ids, response, mask, tok.pad_token_id, with_entropy=True, shared_prefix=shared
        )
        (lp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        on = mask > 0
        assert (lp - ro.logprobs[perm])[on].abs().max() < 1e-4
        assert torch.isfinite(ent[on]).all()
    assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[0].norm()


def test_spread_is_indexing_with_its_sums_in_order():
    """The shared-prefix pass spreads each prompt's keys/values over its answers with _Spread where the rows are
    grouped, index_select otherwise: the same values as ``x[inv]``, and on one thread (the study's) the same gradient
    bits, also when the gradient arrives as a slice (of the cache's concatenation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 2, 7, 16, generator=g, requires_grad=True)
        new = torch.randn(40, 2, 3, 16, generator=g)
        up = torch.randn(40, 2, 10, 16, generator=g)
        for inv in (torch.arange(5).repeat_interleave(8), torch.arange(40).remainder(5)):
            got = []
            for spread in (lambda t, inv=inv: t[inv], _spreader(inv, 5)):
                x.grad = None
                y = spread(x)
                torch.cat([y, new], dim=2).backward(up)
                got.append((y.detach(), x.grad.clone()))
            assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
        assert "Spread" in type(_spreader(torch.arange(5).repeat_interleave(3), 5)(x).grad_fn).__name__
        assert "Spread" not in type(_spreader(torch.tensor([1, 0, 2]), 5)(x).grad_fn).__name__
    finally:
        torch.set_num_threads(threads)


def test_pad_id_falls_back_to_eos_then_the_first_stop_token():
    """One rule for the padding id everywhere (samplers, trainer, supervised batches)."""
    from types import SimpleNamespace

    from nft.modeling import length_mask, pad_id

    vocab = {"<|im_end|>": 7, "<|endoftext|>": 5}
    tok = SimpleNamespace(pad_token_id=3, eos_token_id=4, get_vocab=lambda: vocab)
    assert pad_id(tok) == 3
    tok.pad_token_id = None
    assert pad_id(tok) == 4
    tok.eos_token_id = None
    assert pad_id(tok) == 5
    assert length_mask(torch.tensor([2, 0, 3]), 3).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]


def test_chunked_logprobs_equal_one_pass_with_one_chunk_of_logits_alive(tiny_study):
    """The log-prob pass over chunks of tokens (each chunk's logits recomputed in backward) gives the one-pass
    values, entropies and gradients, on both forward paths; the embedded default's sizes are never chunked."""
    from nft.selective import logit_chunk

    _, _, base = tiny_study
    model, tok = load_policy(str(base))
    problems = build_splits(SyntheticConfig(families=["add"], tiers=["medium"], train_size=50, eval_size=8))["train"]
    ro = TorchSampler(model, tok).sample(
        [render_prompt(tok, p.question) for p in problems[:4]], 3, max_new_tokens=16, seed=2
    )
    on = ro.mask > 0
    V = model.config.vocab_size
    assert logit_chunk(64 * 1024, 512, 128.0) == 0  # 128 MB of logits hold 64K tokens of the embedded vocabulary
    assert logit_chunk(4096, 151936, 128.0) == 220 and logit_chunk(4096, 151936, 0.0) == 0
    chunk_mb = 5 * V * 4 / 2**20  # 5 tokens a chunk
    assert logit_chunk(ro.response.numel(), V, chunk_mb) == 5
    for shared in (False, True):
        out = []
        for mb in (0.0, chunk_mb):
            model.zero_grad()
            lp, ent = response_logprobs(
                model, ro.prompt_ids, ro.response, ro.mask, tok.pad_token_id, 1.3, True, shared, chunk_mb=mb
            )
            (lp * ro.mask).sum().backward()
            out.append((lp, ent, torch.cat([p.grad.flatten() for p in model.parameters()])))
        (lp0, ent0, g0), (lp1, ent1, g1) = out
        # to 1e-6 of the values' scale: the head's matmul over a chunk of rows rounds a few ulps apart on some CPUs
        assert (lp0 - lp1)[on].abs().max() <= 1e-6 * lp0[on].abs().max()
        assert (ent0 - ent1)[on].abs().max() <= 1e-6 * ent0[on].abs().max()
        assert (g0 - g1).norm() <= 1e-6 * g0.norm()


def test_logprob_chunks_below_the_mmap_threshold_are_refused():
    import pytest

    from nft.train.config import TrainConfig

    assert TrainConfig(logprob_chunk_mb=0).logprob_chunk_mb == 0 and TrainConfig().logprob_chunk_mb == 128
    with pytest.raises(ValueError, match="train.logprob_chunk_mb: expected 0 .* or >= 64, got 32"):
        TrainConfig(logprob_chunk_mb=32)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_equals_the_one_pass_head(temperature):
    """:class:`ChunkedHead` against log_softmax over all logits at once: log-probs, entropies and both gradients,
    with chunks that do not divide the rows, a head called as a module (its hooks run) and restored afterwards."""
    from nft.selective import chunked_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda m, a: calls.append(len(a)))
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    w = torch.randn(3, 7, generator=g)
    out = []
    for chunk in (0, 4):
        head.zero_grad()
        hidden.grad = None
        if chunk:
            lp, ent = chunked_logprobs(head, hidden, targets, temperature, chunk)
        else:
            logp_all = torch.log_softmax(head(hidden).float() / temperature, -1)
            lp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            ent = -(logp_all.exp() * logp_all).sum(-1).detach()
        (lp * w).sum().backward()
        out.append((lp.detach(), ent, hidden.grad.clone(), head.weight.grad.clone()))
    assert calls == [1, 2] and "forward" not in vars(head)  # the module was called; its own forward is back
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, a.abs().max().item())
    assert not out[1][1].requires_grad  # the entropy is a statistic


def test_chunked_head_refuses_a_head_with_a_bias():
    from nft.selective import chunked_logprobs

    with pytest.raises(ValueError, match="has a bias; set train.logprob_chunk_mb: 0"):
        chunked_logprobs(torch.nn.Linear(4, 6), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long), 1.0, 1)
