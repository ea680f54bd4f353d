"""Supervised warm-start of the embedded default's tiny base model (the DVC stage ``base``).

Usage: ``nft pretrain --config params.yaml --out models/base``

Builds the synthetic training pool, trains a byte-level BPE tokenizer on it (Qwen2 conventions, Qwen2.5-Math chat
template), initialises a small ``Qwen2ForCausalLM`` and trains it on worked solutions for a fixed step budget. The
traces are made deliberately imperfect -- a fraction with a wrong final result, a fraction cut before the answer --
so that the base model is right only sometimes, like the paper's Qwen2.5-Math-7B base: both positive and negative
answers exist for RL to work with. Output: a ``save_pretrained`` folder (model, tokenizer with chat template,
``pretrain.json`` summary) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_isa
from .data.prompts import END_OF_TURN, SYSTEM_PROMPT, build_messages
from .data.synthetic import Problem, SyntheticConfig, build_splits
from .data.tokenizer import SPECIAL_TOKENS, save_as_qwen2, train_bpe
from .io import atomic_write_json, replace_dir, staging_dir
from .modeling import ModelConfig, build_tiny_qwen2, model_folder


@dataclass
class PretrainConfig:
    """Warm-start of the tiny base model (the ``pretrain`` section of params.yaml)."""

    base_model: str = ""
    """paper presets: a local Hugging Face model folder (e.g. a snapshot of Qwen/Qwen2.5-Math-7B) used as the base
    instead of training one; the stage then only checks it and writes a reference to it."""
    seed: int = 0
    """drives initialisation, batch order and trace noise."""
    steps: int = 2700
    """optimizer steps: the capacity budget that keeps the base model mediocre (the embedded default's)."""
    batch_size: int = 32
    lr: float = 3e-3
    """peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup: int = 100
    weight_decay: float = 0.01
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    wrong_frac: float = 0.05
    """fraction of traces whose final result (last step and boxed answer) is perturbed."""
    truncate_frac: float = 0.02
    """fraction of traces cut before the boxed answer."""
    tokenizer_corpus: int = 4000
    """training-pool questions (with solutions) used to train the BPE."""
    threads: int = 2
    """torch CPU threads (results are bit-identical for the same seed and thread count)."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"pretrain.steps / pretrain.batch_size: must be >= 1, got {self.steps}, {self.batch_size}")
        if not (
            0 <= self.wrong_frac <= 1 and 0 <= self.truncate_frac <= 1 and self.wrong_frac + self.truncate_frac <= 1
        ):
            raise ValueError("pretrain.wrong_frac / pretrain.truncate_frac: need fractions in [0, 1] summing to <= 1")


def prompt_text(question: str) -> str:
    """The chat-template rendering of a question (identical to ``render_prompt`` with the tiny tokenizer; tested),
    needed before the tokenizer exists."""
    msgs = build_messages(question, SYSTEM_PROMPT)
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return body + "<|im_start|>assistant\n"


def _perturb(p: Problem, rng: random.Random) -> str:
    """The solution with a wrong final result (same format, different value)."""
    a = p.answer
    if a.lstrip("-").isdigit():
        delta = rng.choice([-10, -2, -1, 1, 2, 10]) if abs(int(a)) > 10 else rng.choice([-2, -1, 1, 2])
        wrong = str(int(a) + delta)
        wrong_txt = wrong
    else:  # \frac{n}{d} or -\frac{n}{d}
        import re

        m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", a)
        if not m:
            return p.solution
        n = int(m.group(2)) + rng.choice([-1, 1, 2])
        n = n if n > 0 else int(m.group(2)) + 1
        wrong = f"{m.group(1)}\\frac{{{n}}}{{{m.group(3)}}}"
        wrong_txt = f"{m.group(1)}{n}/{m.group(3)}"
    lines = p.solution.split("\n")
    last_step = lines[-2]
    head, _, tail = last_step.rpartition("= ")
    lines[-2] = f"{head}= {wrong_txt}" if head or tail else last_step
    lines[-1] = f"The answer is \\boxed{{{wrong}}}."
    return "\n".join(lines)


def noisy_trace(p: Problem, rng: random.Random, cfg: PretrainConfig) -> str:
    u = rng.random()
    if u < cfg.wrong_frac:
        return _perturb(p, rng)
    if u < cfg.wrong_frac + cfg.truncate_frac:
        cut = rng.randint(1, max(1, p.solution.rfind("\\boxed")))
        return p.solution[:cut]
    return p.solution


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_base(path: str, out: Path) -> dict:
    """Check a hub-format model folder (config, tokenizer with chat template, weights) and write ``out/reference.json``
    pointing at it; the train stage loads ``train.model`` (the same folder)."""
    folder = Path(path)
    lacks = model_folder(path, "pretrain.base_model")
    if lacks:
        raise FileNotFoundError(lacks[0])
    cfg_file = folder / "config.json"
    config = json.loads(cfg_file.read_text())
    weights = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(p.name for p in folder.glob("*.bin"))
    summary = {
        "base_model": str(folder.resolve()),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "weights": weights,
        "config_sha256": hashlib.sha256(cfg_file.read_bytes()).hexdigest(),
    }
    atomic_write_json(out / "reference.json", summary)
    summary.update({"seconds": 0.0, "parameters": 0, "final_loss": float("nan")})
    return summary


def _lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``cfg.lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _padded(prompts: list, responses: list, idx: list[int], pad: int):
    """``(input_ids, attention_mask, labels)`` of prompt + solution rows; the labels are the solution's tokens."""
    seqs = [prompts[i] + responses[i] for i in idx]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, i in enumerate(idx):
        s = seqs[r]
        ids[r, : len(s)] = torch.tensor(s)
        attn[r, : len(s)] = 1
        labels[r, len(prompts[i]) : len(s)] = torch.tensor(responses[i])
    return ids, attn, labels


def _fit(model, prompts: list, responses: list, pad: int, cfg: PretrainConfig, progress: bool) -> list[float]:
    """AdamW (no decay on vectors) over ``cfg.steps`` seeded random batches; returns the loss of every step."""
    from .progress import Progress

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, cfg.adam_beta2),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses: list[float] = []
    bar = Progress("pretrain", cfg.steps, enabled=progress)
    for step in range(cfg.steps):
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=gen).tolist()
        ids, attn, labels = _padded(prompts, responses, idx, pad)
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, step)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(step + 1, loss=losses[-1])
    return losses


def run_pretrain(
    data_cfg: SyntheticConfig, model_cfg: ModelConfig, cfg: PretrainConfig, out: str | Path, progress: bool = True
) -> dict:
    """Train the base model and write it to ``out`` (atomically). Returns the summary written to pretrain.json."""
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    out = Path(out)
    if cfg.base_model:
        return reference_base(cfg.base_model, out)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    train = build_splits(data_cfg)["train"]
    tmp = staging_dir(out)
    try:
        corpus = [prompt_text(p.question) + p.solution + END_OF_TURN + "\n" for p in train[: cfg.tokenizer_corpus]]
        bpe = train_bpe(corpus, model_cfg.vocab_size)
        save_as_qwen2(bpe, tmp)
        # train_bpe adds SPECIAL_TOKENS to the vocabulary, so each has an id
        special = cast("dict[str, int]", {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS})
        seed_everything(cfg.seed)
        model = build_tiny_qwen2(model_cfg, bpe.get_vocab_size(), special)
        model.config.save_pretrained(tmp)  # so that AutoTokenizer sees model_type qwen2, as for hub models
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        rng = random.Random(f"{cfg.seed}-traces")
        prompts = tokenizer([prompt_text(p.question) for p in train], add_special_tokens=False)["input_ids"]
        traces = [noisy_trace(p, rng, cfg) + END_OF_TURN for p in train]
        responses = tokenizer(traces, add_special_tokens=False)["input_ids"]
        pad = special["<|endoftext|>"]
        losses = _fit(model, prompts, responses, pad, cfg, progress)
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = pad
        model.save_pretrained(tmp, safe_serialization=True)
        summary = {
            "seconds": round(time.perf_counter() - t_start, 2),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": bpe.get_vocab_size(),
            "final_loss": float(np.mean(losses[-20:])),
            "loss_curve": [round(x, 4) for x in losses[::10]],
            "weights_sha256": weights_hash(model),
            "cpu_isa": cpu_isa(),  # the kernels' instruction set: part of what fixes the bits (nft.pin_cpu_isa)
            "config": {"data": asdict(data_cfg), "model": asdict(model_cfg), "pretrain": asdict(cfg)},
        }
        (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2))
        replace_dir(tmp, out)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
