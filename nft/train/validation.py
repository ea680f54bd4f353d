"""Validation during training: the evaluation code path on each validation set, with its own k and grader."""

from __future__ import annotations

import time

import numpy as np

from ..dist import Dist
from ..evaluate import EvalConfig, evaluate_problems
from ..reward import GraderPool
from ..rollout import Sampler
from .config import TrainConfig
from .seeds import derive_seed


def validate(
    sampler: Sampler,
    tokenizer,
    val_sets: dict,
    pools: dict[str, GraderPool],
    cfg: TrainConfig,
    seed: int,
    dist: Dist | None = None,
) -> dict:
    """avg@k, pass@k, mean length and policy entropy on each validation set (the evaluation code path, each set with
    its k and grader), and their means over sets (``val/mean/avg@{val_k}``: the mean of each set's avg@k). ``dist``:
    every process validates its share and returns the same metrics (:func:`nft.evaluate.evaluate_problems`)."""
    out, accs, ents = {}, [], []
    t0 = time.perf_counter()
    for name, problems in val_sets.items():
        k = cfg.val_k_per_benchmark.get(name, cfg.val_k)
        grader = cfg.grader_per_set.get(name, cfg.grader)
        ecfg = EvalConfig(
            benchmarks=[name],
            k=k,
            temperature=cfg.val_temperature,
            top_p=cfg.val_top_p,
            max_new_tokens=cfg.max_new_tokens,
            limit=cfg.val_limit,
            graders=[grader],
            grade_truncated=cfg.grade_truncated,
        )
        m, _ = evaluate_problems(
            sampler, tokenizer, problems, ecfg, pools[grader], seed=derive_seed(seed, "val", name), dist=dist
        )
        out[f"val/{name}/avg@{k}"] = m[f"avg@{k}"]
        out[f"val/{name}/pass@{k}"] = m[f"pass@{k}"]
        out[f"val/{name}/length_mean"] = m["mean_length"]
        out[f"val/{name}/entropy"] = m["entropy"]
        accs.append(m[f"avg@{k}"])
        ents.append(m["entropy"])
    out[f"val/mean/avg@{cfg.val_k}"] = float(np.mean(accs))
    out["val/mean/entropy"] = float(np.mean(ents))
    out["time/validate"] = time.perf_counter() - t0
    return out
