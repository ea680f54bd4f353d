"""The online training loop: sample K answers per question, grade them, update the policy; log, validate, checkpoint.

Usage: ``nft train --config params.yaml --algo nft --seed 0 --out runs/nft-s0 [--set train.steps=5 ...]``

One rollout step:
1. draw P questions from a seeded cursor, sample K answers each (the sampler protocol), grade them; the algorithm's
   batch rule keeps groups (``dynamic``: 0 < r-hat < 1, sampling more generation batches until P groups or
   ``max_num_gen_batches``; ``all``; ``positives``: correct answers only);
2. recompute old log-probs with the trainer (as verl) and log their mismatch with the sampler's;
3. split the kept questions into mini-batches (one optimizer step each) and each mini-batch into micro-batches
   (gradient accumulation, exact through ``nft.algorithms.batch_context``); AdamW with warmup and clipping;
4. log namespaced metrics to ``history.jsonl`` and MLflow; validate every ``val_every`` steps; checkpoint every
   ``checkpoint_every`` steps. Re-running on the same folder resumes from the last checkpoint; a finished run
   (``metrics.json`` present) is not redone.

Seeding: one run seed; every other seed is derived from it and logged (``seed/*`` params): data order, sampling
seed per step and generation batch (and rollout shard, under several processes), validation sampling.

Several processes (``train.engine: deepspeed`` under a launcher, see ``nft.train.engines``): each samples and grades
its share of the questions, the kept groups are gathered so every rank holds the whole batch, and each rank trains
on its rows of every mini-batch; rank 0 alone writes the run folder, logs and validates.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from ..algorithms import batch_context, get_spec, loss_normalizer, make_params, overlong_penalty, policy_loss
from ..config import flatten
from ..data.benchmarks import load_benchmark
from ..data.prompts import render_prompt
from ..dist import Dist, launched_world_size
from ..evaluate import EvalConfig, evaluate_problems
from ..modeling import load_policy, model_device, response_logprobs
from ..reward import GraderPool
from ..tracking import MLflowTracker, NullTracker
from .config import TrainConfig
from .engines import DeepSpeedEngine, TorchEngine, init_distributed, model_hidden_size, resolve_deepspeed_config


# ----------------------------------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------------------------------
def derive_seed(seed: int, *names) -> int:
    """A stable 31-bit seed derived from the run seed and a label (independent streams per purpose)."""
    return random.Random(f"{seed}/" + "/".join(map(str, names))).getrandbits(31)


def seed_block(seed: int) -> dict[str, int]:
    """The run's seeds, all derived from one: logged as ``seed/*`` params."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return {"seed/run": seed, "seed/data_order": derive_seed(seed, "data"),
            "seed/sampling_base": derive_seed(seed, "sample"), "seed/validation": derive_seed(seed, "val")}


class Cursor:
    """Seeded pass over the training set: a fresh permutation per epoch; state = (epoch, position)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._make(epoch)

    def _make(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(f"{self.seed}-{epoch}").shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make(self.epoch)
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


# ----------------------------------------------------------------------------------------------------------------------
# Run folder, checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def save_checkpoint(run_dir: Path, tokenizer, engine, cursor: Cursor, step: int) -> None:
    """Atomic: written to ``checkpoint.tmp`` then renamed over ``checkpoint`` (a collective: every rank calls; rank 0
    writes the model and ``state.pt``, every DeepSpeed rank its optimizer shards)."""
    dist = engine.dist
    tmp, final = run_dir / "checkpoint.tmp", run_dir / "checkpoint"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    engine.save_model(tmp / "model", tokenizer)
    engine_state = engine.save_state(tmp)
    dist.barrier()
    if dist.is_main:
        torch.save({
            "engine": engine_state,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "cursor": cursor.state(),
            "step": step,
        }, tmp / "state.pt")
        old = run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _truncate_history(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def fingerprint(resolved: dict, train_set, val_sets: dict, model_dir: str) -> str:
    """What a run's results depend on: its resolved config, the data and the base model (its pretrain summary, or
    its config files for hub models). A run folder with another fingerprint is not resumed."""
    import hashlib

    h = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode())
    h.update(getattr(train_set, "hash", "").encode())
    for name in sorted(val_sets):
        h.update(getattr(val_sets[name], "hash", "").encode())
    for f in ("pretrain.json", "config.json", "model.safetensors.index.json"):
        p = Path(model_dir) / f
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------------
def collect_rollout(sampler, tokenizer, problems, cursor: Cursor, pool: GraderPool, cfg: TrainConfig, rule: str,
                    seed: int, step: int, dist: Dist | None = None):
    """Sample and grade generation batches until the batch rule has P groups (or the generation budget is spent).

    Under several processes every rank draws the same P questions from the cursor, samples and grades its share
    (positions ``rank::world``), and the kept groups of all ranks are gathered, ordered as one process would have
    kept them (generation batch, then position) and cut at P: every rank returns the same whole batch.

    Returns ``(batch, metrics)``; ``batch`` holds the kept rows: prompt_ids, response, mask, sampler logprobs,
    rewards, group ids."""
    dist = dist or Dist()
    P, K = cfg.prompts_per_step, cfg.answers_per_prompt
    shard, shards, leader = rollout_shard(sampler, dist)
    mine = list(range(shard, P, shards))
    kept: list[tuple] = []  # (gen batch, position, group)
    n_kept = 0
    all_rewards, all_lengths, all_finished = [], [], []
    t_sample = t_grade = 0.0
    gen_batches = 0
    n_tokens = 0
    grader_timeouts = grader_errors = 0
    max_batches = cfg.max_num_gen_batches if rule == "dynamic" else 1
    while gen_batches < max_batches and n_kept < P:
        idx = cursor.take(P)
        qs = [problems[idx[j]] for j in mine]
        # one process keeps the seeds of the first version; ranks get their own streams
        sseed = (derive_seed(seed, "sample", step, gen_batches) if dist.world == 1
                 else derive_seed(seed, "sample", step, gen_batches, "rank", shard))
        t0 = time.perf_counter()
        ro = sampler.sample([render_prompt(tokenizer, q.question) for q in qs], K, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=sseed)
        t1 = time.perf_counter()
        verdicts, gstats = pool.grade_many(ro.texts, [q.answer for q in qs for _ in range(K)],
                                           only=ro.finished.tolist())
        grader_timeouts += gstats.timeouts
        grader_errors += len(gstats.errors)
        for err in gstats.errors[:3]:
            print(f"grader: step {step}: {err} (counted as wrong)", file=sys.stderr)
        t2 = time.perf_counter()
        t_sample, t_grade = t_sample + t1 - t0, t_grade + t2 - t1
        n_tokens += int(ro.mask.sum())
        correct = torch.tensor(verdicts, dtype=torch.bool) & ro.finished  # cut at the length limit: negative
        rewards = correct.double()
        all_rewards.append(rewards)
        all_lengths.append(ro.lengths)
        all_finished.append(ro.finished)
        local = 0
        for g, pos in enumerate(mine):
            rows = slice(g * K, (g + 1) * K)
            r = rewards[rows]
            rate = float(r.mean())
            if rule == "dynamic" and not 0.0 < rate < 1.0:
                continue
            if rule == "positives" and rate == 0.0:
                continue
            kept.append((gen_batches, pos, {
                "prompt_ids": ro.prompt_ids[rows], "response": ro.response[rows], "mask": ro.mask[rows],
                "logprobs": ro.logprobs[rows], "rewards": r, "lengths": ro.lengths[rows]}))
            local += 1
        n_kept += int(dist.sum(local if leader else 0))  # every rank takes the same decision
        gen_batches += 1
    rewards = torch.cat(all_rewards)
    lengths = torch.cat(all_lengths).double()
    finished = torch.cat(all_finished)
    seen = [(float(r.mean()) == 1.0, float(r.mean()) == 0.0) for r in rewards.split(K)]
    if dist.world > 1:
        parts = dist.gather((kept, rewards, lengths, finished, seen, n_tokens, t_sample, t_grade, grader_timeouts,
                             grader_errors) if leader else None)
        parts = [part for part in parts if part is not None]  # one copy per shard
        kept = [k for part in parts for k in part[0]]
        rewards, lengths, finished = (torch.cat([part[i] for part in parts]) for i in (1, 2, 3))
        seen = [x for part in parts for x in part[4]]
        n_tokens = sum(part[5] for part in parts)
        t_sample, t_grade = max(part[6] for part in parts), max(part[7] for part in parts)
        grader_timeouts, grader_errors = sum(part[8] for part in parts), sum(part[9] for part in parts)
    kept.sort(key=lambda k: k[:2])
    groups = [k[2] for k in kept[:P]]
    metrics = {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/accuracy": float(rewards.mean()),
        "rollout/groups_kept_frac": len(groups) / max(len(seen), 1),
        "rollout/groups_kept": float(len(groups)),
        "rollout/gen_batches": float(gen_batches),
        "rollout/all_correct_frac": float(np.mean([s[0] for s in seen])),
        "rollout/all_wrong_frac": float(np.mean([s[1] for s in seen])),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clipped_frac": float((~finished).double().mean()),
        "grader/timeouts": float(grader_timeouts),
        "grader/errors": float(grader_errors),
        "time/sample": t_sample,
        "time/grade": t_grade,
        "perf/sample_tokens_per_s": n_tokens / max(t_sample, 1e-9),
    }
    return _stack(groups, K, rule), metrics


def rollout_shard(sampler, dist: Dist) -> tuple[int, int, bool]:
    """(index, count, leader) of this process's share of the questions. One per process, except a vLLM engine
    spanning several processes (tensor parallel): they sample one share together and its first process reports it."""
    return (getattr(sampler, "dp_rank", dist.rank), getattr(sampler, "dp_size", dist.world),
            getattr(sampler, "leader", True))


def _stack(groups: list[dict], K: int, rule: str):
    if not groups:
        return None
    T = max(g["response"].shape[1] for g in groups)

    def pad(t, fill=0):
        return torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill)

    batch = {
        "prompt_ids": [p for g in groups for p in g["prompt_ids"]],
        "response": torch.cat([pad(g["response"]) for g in groups]),
        "mask": torch.cat([pad(g["mask"]) for g in groups]).float(),
        "sampler_logprobs": torch.cat([pad(g["logprobs"]) for g in groups]).float(),
        "rewards": torch.cat([g["rewards"] for g in groups]),
        "lengths": torch.cat([g["lengths"] for g in groups]),
        "group_ids": torch.arange(len(groups)).repeat_interleave(K),
    }
    if rule == "positives":  # RFT trains on the correct answers only
        keep = batch["rewards"] > 0.5
        batch = {k: ([v[i] for i in keep.nonzero().squeeze(-1).tolist()] if isinstance(v, list) else v[keep])
                 for k, v in batch.items()}
    return batch


def _rows(batch: dict, idx: list[int]) -> dict:
    t = torch.tensor(idx, dtype=torch.long)
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[t]) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------------------------------------
def _accumulate(sums: dict[str, float], key: str, value: float) -> None:
    """Add ``value`` into ``sums[key]`` (``ratio_max``: keep the larger)."""
    sums[key] = max(sums.get(key, 0.0), value) if key == "ratio_max" else sums.get(key, 0.0) + value


def _micro_batches(rows: list[int], dist: Dist, mb: int) -> list[list[int]]:
    """This rank's micro-batches of a mini-batch: rows ``rank::world`` in chunks of ``mb``. Every rank gets the same
    number (empty lists where it ran out), so the collectives of a sharded model line up."""
    share = rows[dist.rank::dist.world]
    n = max(1, math.ceil(math.ceil(len(rows) / dist.world) / mb))
    return [share[s * mb: (s + 1) * mb] for s in range(n)]


def update(engine, batch: dict, algo: str, overrides: dict, cfg: TrainConfig, pad_id: int, seed: int, step: int,
           trace: list | None = None):
    """Old log-probs, then one optimizer step per mini-batch of questions. Returns the step's metrics.

    Every rank holds the whole batch and trains on its share of each mini-batch (see ``nft.train.engines``); the
    normaliser is the whole mini-batch's, so the shares' losses add up to the one-process loss. ``trace``, if given,
    receives each optimizer step's loss."""
    model, dist = engine.model, engine.dist
    B = len(batch["prompt_ids"])
    mb = cfg.micro_batch_size
    # mini-batches of whole questions, in a seeded order
    groups = batch["group_ids"].unique().tolist()
    random.Random(derive_seed(seed, "minibatch", step)).shuffle(groups)
    n_mini = max(1, math.ceil(len(groups) / cfg.mini_batch_prompts))
    mini_of = {g: m for m in range(n_mini) for g in groups[m::n_mini]}
    minis = [[] for _ in range(n_mini)]
    for i, g in enumerate(batch["group_ids"].tolist()):
        minis[mini_of[g]].append(i)
    minis = [m for m in minis if m]
    plan = [_micro_batches(rows, dist, mb) for rows in minis]
    shared = not cfg.gradient_checkpointing  # checkpointed layers keep no KV cache to share

    def micro_rows(rows: list[int], first: int) -> dict:
        """The rows, or (a rank with nothing left) one row of the mini-batch with an empty mask: it runs forward and
        backward like the others and adds nothing."""
        sub = _rows(batch, rows or [first])
        if not rows:
            sub["mask"] = torch.zeros_like(sub["mask"])
        return sub

    # old log-probs: the first mini-batch's come from its own (pre-update) forward; the others need a no-grad pass
    t0 = time.perf_counter()
    old = torch.zeros_like(batch["sampler_logprobs"])
    with torch.no_grad():
        for rows, micros in zip(minis[1:], plan[1:]):
            for idx in micros:
                sub = micro_rows(idx, rows[0])
                lp, _ = response_logprobs(model, sub["prompt_ids"], sub["response"], sub["mask"], pad_id,
                                          cfg.temperature, shared_prefix=shared)
                if idx:
                    old[torch.tensor(idx)] = lp.float().cpu()
    t_old = time.perf_counter() - t0

    # group statistics of the whole rollout batch (full groups; RFT's rows are positives only)
    ctx_all = batch_context(algo, mask=batch["mask"], rewards=batch["rewards"], group_ids=batch["group_ids"],
                            **overrides)
    sums: dict[str, float] = {}
    tok_total = 0.0
    grad_norms, ent_sum, ent_tok = [], 0.0, 0.0
    step_losses = []
    t1 = time.perf_counter()
    for m_i, (rows, micros) in enumerate(zip(minis, plan)):
        # the mini-batch's normaliser; group statistics come from the whole rollout batch (ctx_all)
        at_mini = torch.tensor(rows)
        normalizer = loss_normalizer(algo, mask=batch["mask"][at_mini], rewards=batch["rewards"][at_mini],
                                     **overrides)
        mini_loss = 0.0
        for j, idx in enumerate(micros):
            micro = micro_rows(idx, rows[0])
            at = torch.tensor(idx or [rows[0]])
            logp, ent = response_logprobs(model, micro["prompt_ids"], micro["response"], micro["mask"], pad_id,
                                          cfg.temperature, with_entropy=True, shared_prefix=shared)
            logp = logp.float()
            dev = logp.device  # the loss is computed where the model is (inputs stay on the CPU)
            if m_i == 0 and idx:
                old[at] = logp.detach().cpu()
            loss, met = policy_loss(algo, logp=logp, old_logp=old[at].to(dev), mask=micro["mask"].to(dev),
                                    rewards=micro["rewards"].to(dev), group_ids=micro["group_ids"].to(dev),
                                    group_rate=ctx_all["group_rate"][at].to(dev),
                                    group_std=ctx_all["group_std"][at].to(dev), normalizer=normalizer, **overrides)
            engine.backward(loss, last=j == len(micros) - 1)
            if not idx:
                continue
            n_tok = float(micro["mask"].sum())
            tok_total += n_tok
            mini_loss += met["loss"]
            for k, v in met.items():
                if k != "tokens":  # losses add up over micro-batches; the other means are weighted by tokens
                    _accumulate(sums, k, v if k in ("loss", "loss_pos", "loss_neg", "ratio_max") else v * n_tok)
            ent_sum += float((ent.float().cpu() * micro["mask"]).sum())
            ent_tok += n_tok
        grad_norms.append(engine.step())
        step_losses.append(mini_loss)
    t_update = time.perf_counter() - t1
    mine = [i for micros in plan for idx in micros for i in idx]
    on = batch["mask"][mine] > 0
    mismatch = (old[mine] - batch["sampler_logprobs"][mine]).abs()[on]
    mism = (float(mismatch.sum()), int(mismatch.numel()), float(mismatch.max()) if mismatch.numel() else 0.0)
    if dist.world > 1:  # add up the ranks' shares
        parts = dist.gather((sums, tok_total, ent_sum, ent_tok, mism, step_losses))
        sums = {}
        for part in parts:
            for k, v in part[0].items():
                _accumulate(sums, k, v)
        tok_total, ent_sum, ent_tok = (sum(part[i] for part in parts) for i in (1, 2, 3))
        mism = (sum(p[4][0] for p in parts), sum(p[4][1] for p in parts), max(p[4][2] for p in parts))
        step_losses = [sum(x) for x in zip(*(part[5] for part in parts))]
    if trace is not None:
        trace.extend(step_losses)
    out = {
        "train/entropy": ent_sum / max(ent_tok, 1.0),
        "train/grad_norm": float(np.mean(grad_norms)),
        "train/grad_norm_max": float(np.max(grad_norms)),
        "train/lr": engine.lr,
        "train/optimizer_steps": float(len(minis)),
        "train/answers": float(B),
        "train/tokens": tok_total,
        "logprob/mismatch_mean": mism[0] / mism[1] if mism[1] else 0.0,
        "logprob/mismatch_max": mism[2],
        "time/old_logprob": t_old,
        "time/update": t_update,
        "perf/train_tokens_per_s": tok_total / max(t_update, 1e-9),
    }
    for k, v in sums.items():
        if k in ("loss", "loss_pos", "loss_neg"):
            out[f"loss/{k.replace('loss_', '') if k != 'loss' else 'total'}"] = v / len(minis)
        elif k == "ratio_max":
            out["loss/ratio_max"] = v
        else:
            out[f"loss/{k}"] = v / max(tok_total, 1.0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def validate(sampler, tokenizer, val_sets: dict, pool: GraderPool, cfg: TrainConfig, seed: int, step: int) -> dict:
    ecfg = EvalConfig(benchmarks=list(val_sets), k=cfg.val_k, temperature=cfg.val_temperature, top_p=cfg.val_top_p,
                      max_new_tokens=cfg.max_new_tokens, limit=cfg.val_limit, graders=[cfg.grader])
    out, accs = {}, []
    t0 = time.perf_counter()
    for name, problems in val_sets.items():
        m, _ = evaluate_problems(sampler, tokenizer, problems, ecfg, pool, seed=derive_seed(seed, "val", name))
        out[f"val/{name}/avg@{cfg.val_k}"] = m[f"avg@{cfg.val_k}"]
        out[f"val/{name}/pass@{cfg.val_k}"] = m[f"pass@{cfg.val_k}"]
        out[f"val/{name}/length_mean"] = m["mean_length"]
        accs.append(m[f"avg@{cfg.val_k}"])
    out[f"val/mean/avg@{cfg.val_k}"] = float(np.mean(accs))
    out["time/validate"] = time.perf_counter() - t0
    return out


def check_backends(cfg: TrainConfig, world: int | None = None) -> dict | None:
    """Misconfigured engines fail here, before any model loads: vLLM missing or asking for more devices than a
    process has, DeepSpeed missing, a DeepSpeed config that contradicts the batch sizes. Returns the resolved
    DeepSpeed config (``None`` for the torch engine)."""
    import importlib.util

    world = world or launched_world_size()
    if cfg.sampler == "vllm":
        from ..rollout.vllm_sampler import VLLMOptions, check_vllm

        check_vllm(VLLMOptions.from_dict(cfg.vllm), cfg.model, world=world)
    if cfg.engine == "torch":
        if world > 1:
            raise ValueError(f"train.engine: torch trains in one process, but the launcher started {world}; "
                             f"set train.engine: deepspeed")
        return None
    ds = resolve_deepspeed_config(cfg.deepspeed_config, cfg, world, model_hidden_size(cfg.model))
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.engine: deepspeed is not installed here (pip install -e '.[deepspeed]'), "
                         "or set train.engine: torch")
    return ds


def make_sampler(cfg: TrainConfig, engine, tokenizer, seed: int, model_dir: str):
    """The rollout backend, holding the engine's current weights."""
    weights = engine.rollout_weights()
    if cfg.sampler == "torch":
        from ..rollout.torch_sampler import TorchSampler

        if isinstance(weights, torch.nn.Module):  # the trainer's own module
            return TorchSampler(weights, tokenizer)
        # ZeRO-3 shards the trainer's parameters: sample from a full copy, in the trainer's dtype and device
        copy, _ = load_policy(model_dir, dtype=getattr(engine, "dtype", torch.float32))
        sampler = TorchSampler(copy.to(model_device(engine.model)), tokenizer)
    else:
        from ..rollout.vllm_sampler import VLLMSampler

        sampler = VLLMSampler(model_dir, tokenizer, seed=seed, options=cfg.vllm)
    sampler.update_weights(weights)
    return sampler


def run_training(cfg: TrainConfig, algo: str, seed: int, out: str | Path, *, study: str = "nft-study",
                 full_config: dict | None = None, progress: bool = True, tracker=None, on_validate=None,
                 variant: str | None = None) -> dict:
    """Train ``algo`` with ``seed`` into run folder ``out``; resumes from its checkpoint; returns final metrics.

    Under a launcher (``deepspeed``/``torchrun`` with ``train.engine: deepspeed``) every process calls this; rank 0
    alone writes the run folder, logs and validates, and returns the metrics (the other ranks return ``{}``).

    ``on_validate(step, metrics)`` is called after every validation (Optuna reports and prunes from there; an
    exception it raises stops the run with its checkpoint intact)."""
    spec = get_spec(algo)  # unknown algorithm: error before any work
    overrides = dict(cfg.loss.get(algo, {}) or {})
    params = make_params(algo, **overrides)
    rule = spec.batch_rule if cfg.batch_rule == "auto" else cfg.batch_rule
    run_dir = Path(out)
    final_path = run_dir / "metrics.json"
    train_set = load_benchmark(cfg.train_set, cfg.data)
    val_sets = {name: load_benchmark(name, cfg.data) for name in cfg.val_benchmarks}
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"train.model: {cfg.model}: base model folder not found")
    ds_config = check_backends(cfg)
    resolved = {"algo": algo, "seed": seed, "batch_rule": rule, "loss": asdict(params),
                "train": asdict(cfg)}
    fp = fingerprint(resolved, train_set, val_sets, cfg.model)
    dist = init_distributed(cfg.engine)
    fp_file = run_dir / "fingerprint"
    if dist.is_main and run_dir.is_dir() and fp_file.is_file() and fp_file.read_text().strip() != fp:
        print(f"train: {run_dir} holds a run with another configuration, base model or data; starting afresh",
              file=sys.stderr)
        shutil.rmtree(run_dir)
    dist.barrier()
    if final_path.is_file() and fp_file.is_file():
        if not dist.is_main:
            return {}
        print(f"train: {run_dir} is finished (metrics.json present); nothing to do")
        return json.loads(final_path.read_text())
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fp_file.write_text(fp)
    torch.set_num_threads(cfg.threads)
    seeds = seed_block(seed)

    ckpt = run_dir / "checkpoint"
    resume = (ckpt / "state.pt").is_file()
    source = str(ckpt / "model") if resume else cfg.model  # the weights this process starts from
    model, tokenizer = load_policy(source)
    if ds_config is None and torch.cuda.is_available():
        model = model.cuda()  # DeepSpeed places its own
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = TorchEngine(model, cfg) if ds_config is None else DeepSpeedEngine(model, cfg, ds_config)
    cursor = Cursor(len(train_set), seeds["seed/data_order"])
    start_step = 0
    if resume:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        engine.load_state(ckpt, state["engine"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        cursor = Cursor(len(train_set), seeds["seed/data_order"], **state["cursor"])
        start_step = state["step"]
        if dist.is_main:
            _truncate_history(run_dir / "history.jsonl", start_step)
    elif dist.is_main:
        (run_dir / "history.jsonl").unlink(missing_ok=True)

    tags = {"algo": algo, "variant": variant or algo, "seed": str(seed), "study": study, "git_commit": _git_commit(),
            "data_hash": getattr(train_set, "hash", ""), "batch_rule": rule, "engine": cfg.engine,
            "sampler": cfg.sampler, "processes": str(dist.world)}
    if dist.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**(full_config or {}), "resolved": resolved},
                                                             sort_keys=False))
        (run_dir / "tags.json").write_text(json.dumps(tags, indent=2))
    if not dist.is_main:
        tracker = NullTracker()
    elif tracker is None:
        if cfg.tracking:
            run_id_file = run_dir / "mlflow_run_id"
            run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
            tracker = MLflowTracker(cfg.tracking_uri, cfg.experiment, f"{variant or algo}-s{seed}", run_id=run_id,
                                    flush_every=5)
            if tracker.run_id and not tracker.offline:
                run_id_file.write_text(tracker.run_id)
        else:
            tracker = NullTracker()
    if not resume:
        tracker.log_params({**flatten(resolved), **seeds})
        tracker.set_tags(tags)

    sampler = make_sampler(cfg, engine, tokenizer, seed, source)
    # DAPO's overlong penalty shapes the reward; losses that need 0/1 rewards (NFT, RFT) never get it
    shaped_rewards = not getattr(params, "binary_rewards", False)
    history = (run_dir / "history.jsonl").open("a") if dist.is_main else None
    status = "FAILED"
    pool = GraderPool(cfg.grader_workers, cfg.grader)

    def record(row: dict, step: int) -> None:
        if dist.is_main:
            history.write(json.dumps(row) + "\n")
            history.flush()
            tracker.log_metrics(row, step)

    def validate_main(step: int) -> dict:
        """Rank 0 validates (with the other processes of its vLLM engine, if it spans several); the others wait and
        receive its metrics."""
        out = validate(sampler, tokenizer, val_sets, pool, cfg, seed, step) if rollout_shard(sampler, dist)[0] == 0 \
            else None
        return dist.broadcast(out)

    try:
        steps = range(start_step, cfg.steps)
        if progress and dist.is_main:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"{variant or algo}-s{seed}", initial=start_step, total=cfg.steps, mininterval=1.0)
        if start_step == 0:
            row = {"step": 0, **validate_main(0)}
            record(row, 0)
            if on_validate and dist.is_main:
                on_validate(0, row)
        last = {}
        for step in steps:
            t0 = time.perf_counter()
            batch, metrics = collect_rollout(sampler, tokenizer, train_set, cursor, pool, cfg, rule, seed, step, dist)
            if batch is not None and cfg.overlong_buffer and shaped_rewards:
                batch["rewards"] = batch["rewards"] + overlong_penalty(
                    batch["lengths"], cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty).double()
            if batch is not None and len(batch["prompt_ids"]):
                if hasattr(sampler, "sleep"):
                    sampler.sleep()  # vllm.sleep: the GPU's memory to the trainer (woken by the push / sampling)
                metrics.update(update(engine, batch, algo, overrides, cfg, pad_id, seed, step))
                t_push = time.perf_counter()
                sampler.update_weights(engine.rollout_weights())
                metrics["time/weight_push"] = time.perf_counter() - t_push
            else:
                metrics["train/skipped"] = 1.0
            metrics["time/step"] = time.perf_counter() - t0
            done = step + 1
            if (cfg.val_every and done % cfg.val_every == 0) or done == cfg.steps:
                metrics.update(validate_main(done))
            row = {"step": done, **metrics}
            record(row, done)
            last = row
            if progress and dist.is_main:
                steps.set_postfix(acc=f"{metrics['rollout/accuracy']:.2f}",
                                  ent=f"{metrics.get('train/entropy', float('nan')):.2f}")
            if on_validate and dist.is_main and any(k.startswith("val/") for k in metrics):
                on_validate(done, row)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                if dist.is_main:
                    history.flush()
                    os.fsync(history.fileno())
                save_checkpoint(run_dir, tokenizer, engine, cursor, done)
                if hasattr(tracker, "flush"):
                    tracker.flush()
        # final model + final metrics (the run is finished once metrics.json exists)
        final_model = run_dir / "model"
        tmp = run_dir / "model.tmp"
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        engine.save_model(tmp, tokenizer)
        if not dist.is_main:
            status = "FINISHED"
            return {}
        shutil.rmtree(final_model, ignore_errors=True)
        tmp.rename(final_model)
        if not last:  # resumed at the end
            lines = (run_dir / "history.jsonl").read_text().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        final = {k: v for k, v in last.items() if k.startswith("val/")}
        final.update({"steps": cfg.steps, "algo": algo, "seed": seed})
        tmpm = run_dir / "metrics.json.tmp"
        tmpm.write_text(json.dumps(final, indent=2))
        tmpm.replace(final_path)
        status = "FINISHED"
        return final
    finally:
        if history is not None:
            history.close()
        pool.close()
        tracker.finish(status)
