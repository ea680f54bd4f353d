"""The DeepSpeed engine on CPU (gloo): 2 ranks under the ``deepspeed`` launcher take the same optimizer steps as the
one-process torch engine; ``nft train`` runs under the launcher, its ZeRO-3 checkpoints load with
``from_pretrained`` and resume. Slow (each launch ~20 s; the first on a machine JIT-builds DeepSpeed's shm op,
~40 s); ``.ci/run`` installs the extra and runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = str(Path(sys.executable).parent / "deepspeed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    """The environment of a fresh 2-rank CPU launch: drop what an in-process vLLM engine of an earlier test may have
    set (LOCAL_WORLD_SIZE, ...)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def launch_cmd(*args) -> list[str]:
    """``deepspeed --num_gpus 2 ...`` (two CPU ranks here) on a free port."""
    return [LAUNCHER, "--num_gpus", "2", "--master_port", str(_port()), *map(str, args)]


def remove_shm(cmd: list) -> None:
    """The shared-memory buffers of launch ``cmd``'s ranks: a rank that ends normally removes its own
    (nft.dist.leave); a failed or killed one leaves them in /dev/shm."""
    port = cmd[cmd.index("--master_port") + 1]
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        f.unlink(missing_ok=True)


def launch(*args, cwd=None):
    cmd = launch_cmd(*args)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), cwd=cwd or REPO, timeout=600)
    finally:
        remove_shm(cmd)
    if r.returncode != 0:
        raise AssertionError(f"launch failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def zero3_params(params, tmp_path, **train) -> Path:
    """The tiny study's params with the DeepSpeed ZeRO-3 engine and these train keys, written under ``tmp_path``."""
    cfg = yaml.safe_load(Path(params).read_text())
    cfg["train"].update(engine="deepspeed", deepspeed_config=str(REPO / "experiments/deepspeed/zero3.json"), **train)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def torch_reference(base, algo, drop=(), tokens: int = 0):
    from nft.modeling import load_policy
    from nft.train.engines import TorchEngine
    from nft.train.update import update
    from tests.train.ds_worker import config, fixed_batch

    CFG = config(tokens)

    torch.manual_seed(0)
    model, tok = load_policy(str(base))
    batch = fixed_batch(model, tok, drop)
    trace: list[float] = []
    metrics = update(TorchEngine(model, CFG), batch, algo, {}, CFG, tok.pad_token_id, seed=0, step=0, trace=trace)
    return trace, metrics, model


@pytest.mark.parametrize(
    "stage,algo,drop,tokens,chunk_mb",
    [
        ("zero3", "nft", (), 0, 0),
        ("zero2", "grpo", (), 0, 0),
        ("zero3", "rft", (1, 2, 9, 13, 17), 0, 0),  # uneven mini-batches: a rank runs an empty micro-batch
        ("zero3", "dapo", (), 60, 0),  # micro-batches by tokens: passes of like lengths, as many on both ranks
        # the chunked head (nft.selective) under ZeRO-3, 5 tokens a chunk: its weight gathered for the forward and the
        # backward by the head module's hooks; against the torch engine's one pass
        ("zero3", "nft", (), 0, 0.01),
    ],
)
def test_two_ranks_take_the_torch_engines_steps(tiny_study, tmp_path, stage, algo, drop, tokens, chunk_mb):
    _, _, base = tiny_study
    launch(
        REPO / "tests/train/ds_worker.py",
        "--model",
        base,
        "--ds-config",
        REPO / f"experiments/deepspeed/{stage}.json",
        "--out",
        tmp_path,
        "--algo",
        algo,
        "--drop",
        ",".join(map(str, drop)),
        "--tokens",
        tokens,
        "--chunk-mb",
        chunk_mb,
    )
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["world"] == 2 and res["stage"] == int(stage[-1])
    ref_losses, ref_metrics, ref_model = torch_reference(base, algo, drop, tokens)
    assert len(ref_losses) == len(res["losses"]) == 3  # 3 optimizer steps
    assert max(abs(a - b) for a, b in zip(ref_losses, res["losses"])) < 1e-5, (ref_losses, res["losses"])
    assert any(abs(x) > 1e-4 for x in ref_losses[1:])  # the comparison is not between zeros
    for key in ("loss/total", "train/grad_norm", "train/tokens", "train/batch_entropy"):
        assert abs(res["metrics"][key] - ref_metrics[key]) < 1e-5 * max(1.0, abs(ref_metrics[key])), key
    # the weights the ranks wrote (gathered from ZeRO-3 shards) load as a plain transformers model
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    ref = ref_model.state_dict()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-4


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_both(tiny_study, tmp_path, monkeypatch, stage):
    """Question 2's losses are NaN on rank 0 only: the mini-batch holding it is skipped by both ranks (ZeRO's global
    norm), counted, and the weights equal the torch engine's, which drops the same mini-batch."""
    import nft.train.update as up
    from tests.train.ds_worker import poisoned

    _, _, base = tiny_study
    launch(
        REPO / "tests/train/ds_worker.py",
        *("--model", base, "--ds-config", REPO / f"experiments/deepspeed/{stage}.json", "--out", tmp_path),
        *("--poison", 2),
    )
    res = json.loads((tmp_path / "result.json").read_text())
    monkeypatch.setattr(up, "policy_loss", poisoned(2))
    ref_losses, ref_metrics, ref_model = torch_reference(base, "nft")
    assert ref_metrics["train/skipped_steps"] == res["metrics"]["train/skipped_steps"] == 1
    # the loop records every mini-batch's loss (mini-batch 1 holds question 2); the torch engine stops at the NaN
    applied = [res["losses"][0], res["losses"][2]]
    assert len(res["losses"]) == 3 and max(abs(a - b) for a, b in zip(ref_losses, applied, strict=True)) < 1e-5
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    ref = ref_model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-4


def test_a_zero3_push_holds_one_bucket_at_a_time(tiny_study, tmp_path):
    """The push gathers bucket by bucket: never more than one bucket's bytes (or one larger parameter) gathered at
    once, in more than one bucket, every state-dict name pushed (the tied lm_head too)."""
    _, _, base = tiny_study
    ds = json.loads((REPO / "experiments/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the tiny model's parameters all partitioned
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    launch(
        REPO / "tests/train/ds_worker.py",
        *("--model", base, "--ds-config", tmp_path / "zero3.json", "--out", tmp_path),
        *("--push-mb", 0.01),
    )
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["total"] > 3 * max(res["limit"], res["largest"]), res  # several buckets
    assert 0 < res["peak_gathered"] <= max(res["limit"], res["largest"]), res
    assert res["pairs"] == res["names"]  # every state-dict name, the tied lm_head.weight included


def test_nft_train_under_the_launcher_zero3(tiny_study, tmp_path):
    params, _, _ = tiny_study
    p = zero3_params(params, tmp_path, steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    launch("--module", "nft.cli", "train", "--config", p, "--arm", "nft", "--seed", "0", "--out", out, "--quiet")
    rows = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone writes
    assert json.loads((out / "tags.json").read_text())["processes"] == "2"
    assert all(r["train/optimizer_steps"] >= 1 for r in rows[1:])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoint" / "model").state_dict()
    assert all(torch.equal(final[k], ckpt[k]) for k in final)
    # resume from the ZeRO-3 checkpoint (optimizer shards of both ranks): finishes with the same model
    (out / "metrics.json").unlink()
    launch("--module", "nft.cli", "train", "--config", p, "--arm", "nft", "--seed", "0", "--out", out, "--quiet")
    again = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert (out / "metrics.json").is_file()


def test_a_zero3_checkpoint_resumes_at_another_world_size_through_the_universal_format(tiny_study, tmp_path):
    """Written by 2 ranks at step 1, resumed by 1 process: refused with the one conversion command; once converted,
    the same command resumes (optimizer and schedule from the universal checkpoint) and finishes the run. The
    optimizer runs in several sub-groups per rank (``sub_group_size``), as a 7B model's partition does under the
    preset's zero3.json."""
    params, _, _ = tiny_study
    ds = json.loads((REPO / "experiments/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["sub_group_size"] = 20_000  # the tiny model's partition (70 k per rank) in several groups
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    p = zero3_params(params, tmp_path, steps=2, checkpoint_every=1)
    cfg = yaml.safe_load(p.read_text())
    cfg["train"]["deepspeed_config"] = str(tmp_path / "zero3.json")
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    train = ["--module", "nft.cli", "train", "--config", p, "--arm", "nft", "--seed", "0", "--out", out, "--quiet"]
    launch(*train)
    optim = torch.load(next((out / "checkpoint").rglob("*optim_states.pt")), weights_only=False)
    assert len(optim["optimizer_state_dict"]["fp32_flat_groups"]) > 1  # several sub-groups
    # back to step 1: the newest checkpoint dropped, the previous one (step 1) the one to resume from
    import shutil

    shutil.rmtree(out / "checkpoint")
    (out / "checkpoint.prev").rename(out / "checkpoint")
    (out / "metrics.json").unlink()
    one = [sys.executable, "-m", "nft.cli", *map(str, train[2:])]
    r = subprocess.run(one, capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=600)
    assert r.returncode != 0 and "written by 2 processes and this run has 1" in r.stderr, r.stderr[-2000:]
    cmd = r.stderr.strip().splitlines()[-1].strip()
    assert cmd.startswith("python -m deepspeed.checkpoint.ds_to_universal"), cmd
    conv = subprocess.run(
        [sys.executable, *cmd.split()[1:]], capture_output=True, text=True, env=launch_env(), timeout=600
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    r = subprocess.run(one, capture_output=True, text=True, env=launch_env(), cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "tags.json").read_text())["processes"] == "1"
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("tp", [1, 2])
def test_zero3_with_vllm_sampler_under_the_launcher(tiny_study_vllm, tmp_path, tp):
    """2 ranks: one vLLM engine each (tp 1) or one engine across both (tp 2, vLLM's external_launcher backend).
    The trainer's old log-probs equal the engine's at sampling time only if the gathered ZeRO-3 weights, tied
    lm_head included, reached the engine after step 1."""
    pytest.importorskip("vllm")
    params, _, _ = tiny_study_vllm
    p = zero3_params(params, tmp_path, steps=2, sampler="vllm", vllm={"tensor_parallel_size": tp})
    out = tmp_path / "run"
    launch("--module", "nft.cli", "train", "--config", p, "--arm", "nft", "--seed", "0", "--out", out, "--quiet")
    rows = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["train/optimizer_steps"] >= 1
        assert r["logprob/mismatch_max"] < 1e-3, r["logprob/mismatch_max"]
