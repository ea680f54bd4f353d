"""The documented configuration of ``nft train`` (the ``train`` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class TrainConfig:
    """Online RL / NFT training: sample K answers per question, grade, update (the ``train`` section)."""

    model: str = "models/base"
    """folder of the base policy (``save_pretrained`` format; the ``base`` stage's output or a hub snapshot)."""
    data: str = "data"
    """folder of the prepared data (``train.jsonl``, ``synth-*.jsonl``) from ``nft prepare``; the benchmark registry
    is used for other sets."""
    train_set: str = "train"
    """training set name: ``train`` (the synthetic pool in ``data``) or a registry name such as ``dapo-math-17k``."""
    steps: int = 30
    """rollout steps (each: sample, grade, several optimizer steps)."""
    prompts_per_step: int = 16
    """P: questions per rollout step (paper: 512)."""
    answers_per_prompt: int = 8
    """K: sampled answers per question (paper: 16)."""
    mini_batch_prompts: int = 4
    """questions per optimizer step; P / this = optimizer steps per rollout step (paper: 512 / 32 = 16)."""
    micro_batch_size: int = 64
    """answers per forward/backward (gradient accumulation inside a mini-batch; exact, see nft.algorithms)."""
    max_new_tokens: int = 48
    """response length limit; answers cut there are negative (paper: 3,584 / 14,336)."""
    temperature: float = 1.0
    top_p: float = 1.0
    batch_rule: Literal["auto", "all", "dynamic", "positives"] = "auto"
    """which groups to train on; ``auto`` = the algorithm's own (NFT, DAPO: dynamic sampling; RFT: positives)."""
    max_num_gen_batches: int = 3
    """dynamic sampling: at most this many generation batches per rollout step to collect P mixed groups."""
    lr: float = 5e-5
    """the embedded default's: a tiny model is wrecked by larger fine-tuning steps (measured: 5e-4 halves its
    accuracy within 10 steps). The paper presets set 1e-6."""
    warmup_steps: int = 2
    """linear warmup in optimizer steps, then constant (as the paper)."""
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    loss: dict[str, dict[str, Any]] = field(default_factory=dict)
    """per-algorithm loss hyperparameter overrides, e.g. ``{nft: {eps: 1.0, omega: one_minus_r}}``."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty buffer in tokens (0: off), applied to GRPO-family rewards."""
    overlong_penalty: float = 1.0
    val_every: int = 10
    """validation every N rollout steps (and at steps 0 and the last); 0: only at the end."""
    val_benchmarks: list[str] = field(default_factory=lambda: ["synth-easy", "synth-medium", "synth-hard"])
    val_k: int = 4
    val_limit: int = 200
    """questions per validation set (0: all)."""
    val_temperature: float = 1.0
    val_top_p: float = 1.0
    checkpoint_every: int = 10
    """checkpoint every N rollout steps (and at the end)."""
    threads: int = 2
    grader: str = "math_verify"
    grader_workers: int = 2
    sampler: Literal["torch", "vllm"] = "torch"
    """rollout backend."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """vLLM engine options (tensor_parallel_size, gpu_memory_utilization, max_model_len, enforce_eager, sleep)."""
    engine: Literal["torch", "deepspeed"] = "torch"
    """training engine (``deepspeed``: ZeRO per ``deepspeed_config``, across the processes of a launcher)."""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (7B/32B with long answers); the trainer pass then packs each
    prompt with its answer instead of sharing the prompt's KV cache."""
    deepspeed_config: str = ""
    """DeepSpeed JSON config (engine=deepspeed)."""
    experiment: str = ""
    """MLflow experiment; empty: the study's name (``study.name``)."""
    tracking_uri: str = ""
    """MLflow URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<repository>/mlflow.db (nft.tracking.resolve_uri)."""
    tracking: bool = True

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "answers_per_prompt", "mini_batch_prompts", "micro_batch_size",
                     "max_new_tokens", "max_num_gen_batches", "val_k", "threads", "grader_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_prompts > self.prompts_per_step:
            raise ValueError(f"train.mini_batch_prompts ({self.mini_batch_prompts}) exceeds train.prompts_per_step "
                             f"({self.prompts_per_step})")
        if self.answers_per_prompt < 2:
            raise ValueError("train.answers_per_prompt: group statistics need >= 2 answers per question")
        if self.lr <= 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 < self.temperature:
            raise ValueError(f"train.temperature: must be > 0, got {self.temperature}")
        if len(self.adam_betas) != 2:
            raise ValueError("train.adam_betas: expected two numbers")
        from ..algorithms import LOSSES, make_params

        unknown = sorted(set(self.loss) - set(LOSSES))
        if unknown:
            raise ValueError(f"train.loss: unknown algorithm(s) {unknown}; registered: {sorted(LOSSES)}")
        for algo, overrides in self.loss.items():
            try:
                make_params(algo, **(overrides or {}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"train.loss.{algo}: {e}") from None
        from ..reward import get_grader

        get_grader(self.grader)  # an unknown grader: an error naming the registered ones, before any work
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("train.deepspeed_config: required when train.engine is deepspeed")
