"""Metric definitions on hand-computed cases and a deterministic fake sampler; the evaluate CLI end to end."""

import json
import os
import subprocess
import sys
from math import comb

import numpy as np
import pytest
import torch

from nft.evaluate import EvalConfig, evaluate_problems, majority_correct, pass_at_k, summarize
from nft.reward import GraderPool
from nft.rollout.base import Rollout
from tests.conftest import nft_cli


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (10, 3, 5), (32, 5, 8), (5, 5, 3), (16, 1, 16)])
def test_pass_at_k_closed_form(n, c, k):
    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert abs(pass_at_k(n, c, k) - expected) < 1e-12


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0


def test_majority():
    assert majority_correct(["3", "4", "3", None], [True, False, True, False])
    assert not majority_correct(["4", "4", "3", "3"], [False, False, True, True])  # tie: earliest answer wins
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["\\dfrac{1}{2}", "\\frac{1}{2}", "5"], [True, True, False])


def test_summarize_exact():
    correct = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    m = summarize(
        correct,
        np.full((3, 4), 10),
        np.zeros(12, dtype=bool),
        [["1", "2", "3", "1"], ["5", "5", None, "6"], ["7"] * 4],
        4,
    )
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(2 / 3)
    assert m["stderr"] == pytest.approx(np.std([0.5, 0.0, 1.0], ddof=1) / np.sqrt(3))


class FakeSampler:
    """Answer j of every problem is right iff j < (problem index mod k + 1) -- a known accuracy."""

    def sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        texts = []
        for p in prompts:
            q = int(p.split("Q")[1].split("?")[0])
            texts += [f"\\boxed{{{q if j < (q % n) + 1 else q + 1}}}" for j in range(n)]
        B = len(texts)
        return Rollout(
            [[0]] * B,
            torch.zeros(B, 1, dtype=torch.long),
            torch.ones(B, 1),
            torch.zeros(B, 1),
            torch.ones(B, dtype=torch.bool),
            texts,
        )


class Tok:
    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return msgs[-1]["content"]


def test_avg_at_k_of_a_fake_sampler_is_exact():
    from nft.data.benchmarks import Item

    problems = [Item(str(i), f"Q{i}?", str(i)) for i in range(12)]
    with GraderPool(1) as pool:
        m, recs = evaluate_problems(FakeSampler(), Tok(), problems, EvalConfig(k=4, prompts_per_batch=5), pool)
    expected = np.mean([((i % 4) + 1) / 4 for i in range(12)])
    assert m["avg@4"] == pytest.approx(expected)
    assert m["pass@4"] == 1.0 and m["maj@4"] == pytest.approx(
        np.mean([(i % 4) + 1 >= 2 for i in range(12)])
    )  # ties: earliest (right) answer
    assert len(recs) == 48


def test_evaluate_cli(tiny_study, tmp_path):
    params, data, base = tiny_study
    out, samples = tmp_path / "e.json", tmp_path / "s.jsonl"
    nft_cli(
        "evaluate",
        "--model",
        base,
        "--benchmarks",
        "synth-easy,synth-medium",
        "--k",
        "2",
        "--limit",
        "6",
        "--data",
        data,
        "--out",
        out,
        "--samples",
        samples,
    )
    res = json.loads(out.read_text())
    assert set(res) == {"synth-easy", "synth-medium", "mean"}  # metrics only: the settings go beside them
    meta = json.loads((tmp_path / "e.meta.json").read_text())
    assert meta["config"]["k"] == 2 and set(meta["seconds"]) == {"synth-easy", "synth-medium"}
    for name in ("synth-easy", "synth-medium"):
        m = res[name]
        assert m["problems"] == 6 and 0 <= m["avg@2"] <= m["pass@2"] <= 1
        assert "dapo/avg@2" in m and "dapo/disagreement" in m
        assert all(isinstance(v, (int, float)) for v in m.values())
    lines = samples.read_text().splitlines()
    assert len(lines) == 2 * 6 * 2 and "answer_text" in json.loads(lines[0])
    bad = nft_cli(
        "evaluate",
        "--model",
        base,
        "--benchmarks",
        "synth-easy,nope",
        "--out",
        tmp_path / "x.json",
        "--data",
        data,
        check=False,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr and not (tmp_path / "x.json").exists()


def test_evaluate_under_a_launcher_splits_the_work_and_writes_what_one_process_writes(tiny_study, tmp_path):
    """``torchrun --nproc-per-node 2 -m nft.cli evaluate``: each process samples and grades its blocks (7 problems in
    blocks of 2: 4 blocks, 2 and 2), rank 0 writes; the metrics and every answer equal one process's."""
    _, data, base = tiny_study
    args = ["--model", base, "--benchmarks", "synth-easy,synth-medium", "--k", "2", "--limit", "7", "--data", data]
    args += ["--set", "prompts_per_batch=2", "--set", "workers=1"]
    nft_cli("evaluate", *args, "--out", tmp_path / "one.json", "--samples", tmp_path / "one.jsonl")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run(
        [*run, "-m", "nft.cli", "evaluate", *map(str, args), "--out", tmp_path / "two.json"]
        + ["--samples", str(tmp_path / "two.jsonl")],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert json.loads((tmp_path / "two.meta.json").read_text())["processes"] == 2
    assert r.stdout.count("evaluate: synth-easy") == 1  # rank 0 reports


def test_leave_keeps_a_group_a_library_opened_in_a_single_process(tmp_path):
    """``nft.dist.leave`` (called when a command succeeds) closes the launcher's group only: in a single process, a
    group that vLLM's in-process engine opened stays for vLLM's own shutdown to destroy."""
    code = (
        "import torch.distributed as td; from nft.dist import leave\n"
        f"td.init_process_group('gloo', init_method='file://{tmp_path}/g', rank=0, world_size=1)\n"
        "leave(); print(td.is_initialized())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
