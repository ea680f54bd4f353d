"""The preallocated-cache sampler: in-place compaction moves only the rows it must, its log-probs are the trainer's
on every row however the batch was compacted, both attention paths (prepared sdpa mask, transformers' mask) draw
the same answers, and the model's attention setting is left as it was."""

import pytest
import torch

from nft.data.prompts import render_prompt
from nft.data.synthetic import SyntheticConfig, build_splits
from nft.modeling import load_policy, response_logprobs
from nft.rollout import kv_cache
from nft.rollout.kv_cache import SlabCache, _compaction
from nft.rollout.torch_sampler import TorchSampler


def test_compaction_fills_each_hole_with_one_live_row_from_the_tail():
    live = torch.tensor([True, False, True, False, True, True, False, True])
    dst, src, m = _compaction(live)
    assert m == 5 and dst.tolist() == [1, 3] and src.tolist() == [5, 7]
    slots = torch.arange(8)
    slots[dst] = slots[src]
    assert sorted(slots[:m].tolist()) == live.nonzero().squeeze(-1).tolist()  # every live row, once, in front
    assert _compaction(torch.ones(4, dtype=torch.bool))[0].numel() == 0  # nothing to move


def test_slab_cache_writes_in_place_and_moves_rows():
    cache = SlabCache(num_layers=1, rows=4, capacity=6)
    layer = cache.layers[0]
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)  # 2 prompts, 1 head, 3 positions
    keys, _ = cache.update(k, -k, 0)
    assert torch.equal(keys, k) and cache.get_seq_length() == 3
    cache.batch_repeat_interleave(2)  # 2 prompts -> 4 rows
    assert torch.equal(layer.keys[:, :, :3], k.repeat_interleave(2, 0))
    buffer = layer.keys.data_ptr()
    step = torch.full((4, 1, 1, 2), 7.0)
    keys, values = cache.update(step, -step, 0)
    assert layer.keys.data_ptr() == buffer and keys.shape == (4, 1, 4, 2)  # a view of the same buffer, no copy
    assert torch.equal(keys[:, :, 3], step[:, :, 0]) and torch.equal(values[:, :, 3], -step[:, :, 0])
    row3 = layer.keys[3, :, :4].clone()
    cache.move_rows(torch.tensor([0]), torch.tensor([3]))
    assert torch.equal(layer.keys[0, :, :4], row3)
    with pytest.raises(RuntimeError, match="capacity"):
        cache.update(torch.zeros(4, 1, 3, 2), torch.zeros(4, 1, 3, 2), 0)


@pytest.fixture(scope="module")
def policy(tiny_study):
    _, _, base = tiny_study
    model, tok = load_policy(str(base))
    problems = build_splits(SyntheticConfig(train_size=200, eval_size=8))["train"]
    prompts = [render_prompt(tok, p.question) for p in problems[:6]]  # different lengths: left padding
    return model, tok, prompts


@pytest.mark.parametrize("cascade", [False, True])
def test_every_row_matches_the_trainer_through_compactions(policy, monkeypatch, cascade):
    model, tok, prompts = policy
    moves, cascades = [], []
    real, real_cascade = SlabCache.move_rows, kv_cache._cascade
    monkeypatch.setattr(SlabCache, "move_rows", lambda self, dst, src: (moves.append(len(dst)), real(self, dst, src)))
    monkeypatch.setattr(kv_cache, "_cascade", lambda *a: (cascades.append(a[3].compacted), real_cascade(*a))[1])
    ro = TorchSampler(model, tok, cascade=cascade).sample(prompts, 4, max_new_tokens=48, temperature=1.2, seed=11)
    assert (True in cascades and False in cascades) if cascade else not cascades  # before and after compactions
    lengths = ro.mask.sum(-1)
    assert ro.finished.any() and lengths.min() < lengths.max()  # rows ended at different steps
    assert moves and sum(moves) > 0  # the batch was compacted, rows moved
    assert sum(moves) < len(moves) * 24  # ... by moving some rows, not the whole batch each time
    lp, _ = response_logprobs(model, ro.prompt_ids, ro.response, ro.mask, tok.pad_token_id, temperature=1.2)
    on = ro.mask > 0
    assert (lp - ro.logprobs)[
        on
    ].abs().max() < 3e-5  # fp32 sums in another order (cached vs one pass); a wrong row is off by >0.1


def test_prepared_mask_and_transformers_mask_draw_the_same_answers(policy, tiny_study):
    model, tok, prompts = policy
    assert model.config._attn_implementation == "sdpa"
    a = TorchSampler(model, tok).sample(prompts, 3, max_new_tokens=32, seed=5)
    assert model.config._attn_implementation == "sdpa"  # switched for the decoding steps only, then restored
    eager, _ = load_policy(str(tiny_study[2]))
    eager.config._attn_implementation = "eager"  # the other path: transformers builds the mask each step
    b = TorchSampler(eager, tok).sample(prompts, 3, max_new_tokens=32, seed=5)
    assert eager.config._attn_implementation == "eager"
    assert torch.equal(a.response, b.response) and torch.equal(a.finished, b.finished)
    assert (a.logprobs - b.logprobs).abs().max() < 1e-5


def test_cascade_keeps_the_prompts_once_and_moves_only_answer_positions():
    cache = SlabCache(num_layers=1, rows=4, capacity=6)
    layer = cache.layers[0]
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float).view(2, 1, 3, 2)  # 2 prompts, 1 head, 3 positions
    cache.update(k, -k, 0)
    cache.keep_prefix(2)
    step = torch.arange(4, dtype=torch.float).view(4, 1, 1, 1).expand(4, 1, 1, 2)
    keys, values = cache.update(step, -step, 0)
    assert keys.shape == (4, 1, 1, 2) and torch.equal(keys, step)  # each row's own positions only
    assert torch.equal(layer.prefix()[0], k) and torch.equal(layer.prefix()[1], -k)  # the prompts, once
    cache.move_rows(torch.tensor([0]), torch.tensor([3]))  # slot 0 (also prompt 0's row) takes answer 3
    assert torch.equal(layer.keys[0, :, 3], step[3, :, 0]) and torch.equal(layer.prefix()[0], k)


def test_cascade_is_chosen_by_the_prompt_bytes_it_saves(policy, monkeypatch):
    model, tok, _ = policy
    sampler = TorchSampler(model, tok)
    cfg = model.config
    per = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2 * 4  # bytes per position
    monkeypatch.setattr(kv_cache, "CASCADE_MIN_BYTES", 10 * 7 * 50 * per)
    cpu = torch.device("cpu")
    assert sampler._use_cascade(model, 10, 8, 50, cpu) and not sampler._use_cascade(model, 10, 8, 49, cpu)
    assert not sampler._use_cascade(model, 10, 8, 50, torch.device("meta"))  # measured on CPU only
    assert TorchSampler(model, tok, cascade=True)._use_cascade(model, 1, 2, 1, cpu)


def test_cascade_draws_the_same_answers(policy):
    model, tok, prompts = policy
    ref = TorchSampler(model, tok, cascade=False).sample(prompts, 3, max_new_tokens=32, seed=7)
    got = TorchSampler(model, tok, cascade=True).sample(prompts, 3, max_new_tokens=32, seed=7)
    assert torch.equal(ref.response, got.response) and torch.equal(ref.finished, got.finished)
    assert (ref.logprobs - got.logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["fold", "repeat", "transformers"])
def test_every_decode_attention_mode_draws_the_same_answers(policy, monkeypatch, mode):
    model, tok, prompts = policy
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped query heads to serve
    ref = TorchSampler(model, tok).sample(prompts, 3, max_new_tokens=32, seed=7)
    monkeypatch.setitem(kv_cache.DECODE_GQA, "cpu", mode)
    got = TorchSampler(model, tok).sample(prompts, 3, max_new_tokens=32, seed=7)
    assert torch.equal(ref.response, got.response)
    assert (ref.logprobs - got.logprobs).abs().max() < 5e-5  # another summation order; the answers are equal


def test_pushed_pairs_are_copied_in_one_by_one_tied_names_and_all(tiny_study):
    """A gather's ``(name, tensor)`` pairs land in the sampler's own module (each pair copied as it comes: the
    generator's tensors are dropped after it); a missing or unknown name is refused."""
    _, _, base = tiny_study
    trainer, tok = load_policy(str(base))
    copy, _ = load_policy(str(base))
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.5)
    sampler = TorchSampler(copy, tok)
    sampler.update_weights(lambda: ((k, v.clone()) for k, v in trainer.state_dict().items()))
    assert all(torch.equal(v, copy.state_dict()[k]) for k, v in trainer.state_dict().items())
    assert sampler.model is copy  # loaded into, not replaced
    with pytest.raises(ValueError, match="missing .*model.norm.weight"):
        sampler.update_weights(lambda: ((k, v) for k, v in trainer.state_dict().items() if k != "model.norm.weight"))
    with pytest.raises(ValueError, match="unexpected .*'extra'"):
        sampler.update_weights({**trainer.state_dict(), "extra": torch.zeros(1)})


def test_answer_uniforms_depend_on_seed_answer_step_and_token_only():
    from nft.rollout.chunks import answer_uniforms

    u = answer_uniforms(7, torch.tensor([3, 4, 5]), 2, 1000)
    assert torch.equal(u[1:], answer_uniforms(7, torch.tensor([4, 5]), 2, 1000))  # the others in the call do not matter
    assert not torch.equal(u[0], answer_uniforms(8, torch.tensor([3]), 2, 1000)[0])
    assert not torch.equal(u[0], answer_uniforms(7, torch.tensor([3]), 3, 1000)[0])
    big = answer_uniforms(0, torch.arange(200), 0, 5000)
    assert float(big.min()) > 0 and float(big.max()) < 1
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002


def test_a_memory_budget_samples_in_chunks_with_the_tokens_of_one_block(policy):
    """A budget that takes 2 of the 6 prompts per chunk (3 calls of the model) draws the same answers as a budget
    that takes them all at once."""
    from nft.rollout import chunks

    model, tok, prompts = policy
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    n, new = 3, 12
    per_prompt = n * chunks.bytes_per_answer(model.config, longest, new, torch.float32)
    per_prompt += chunks.bytes_per_prompt(model.config, longest, torch.float32)
    calls = []
    kw = dict(max_new_tokens=new, seed=5)
    whole = TorchSampler(model, tok, memory_mb=1e6).sample(prompts, n, **kw)
    chunked = TorchSampler(model, tok, memory_mb=2.5 * per_prompt / 2**20)
    real = chunked._sample
    chunked._sample = lambda p, *a, **k: calls.append(len(p)) or real(p, *a, **k)
    parts = chunked.sample(prompts, n, **kw)
    assert calls == [2, 2, 2]
    assert parts.texts == whole.texts and torch.equal(parts.response, whole.response)
    assert torch.equal(parts.finished, whole.finished) and torch.equal(parts.mask, whole.mask)
    assert torch.allclose(parts.logprobs, whole.logprobs, atol=1e-5)
    assert len({t for t in whole.texts}) > 3  # the answers differ from one another
