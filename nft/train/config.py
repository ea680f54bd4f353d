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
    steps: int = 60
    """rollout steps (each: sample, grade, several optimizer steps)."""
    prompts_per_step: int = 128
    """P: questions per rollout step (paper: 512). The embedded default's 128 (``experiments/sweeps/batch.yaml``):
    at 16 every algorithm plateaued about 4 points above the base model; larger batches take larger steps stably."""
    answers_per_prompt: int = 8
    """K: sampled answers per question (paper: 16)."""
    mini_batch_prompts: int = 64
    """questions per optimizer step (the embedded default's: 2 optimizer steps per rollout step, chosen by
    ``experiments/sweeps/shared.yaml`` and kept by ``batch.yaml``); P / this = optimizer steps per rollout step (paper: 512 / 32 = 16). 0: all P
    questions in one mini-batch, one optimizer step per rollout step (strictly on-policy)."""
    micro_batch_size: int = 128
    """answers per forward/backward (gradient accumulation inside a mini-batch; exact, see nft.algorithms)."""
    micro_batch_tokens: int = 0
    """> 0: micro-batches by tokens instead (verl's dynamic batch size, as the official code: 4,096 per GPU): a
    rank's share of a mini-batch is split into ceil(its prompt + answer tokens / this) micro-batches (the largest
    count over ranks, so their collectives line up), balanced by the largest differencing method as verl's
    ``rearrange_micro_batches`` (with ``normalizer: mini_batch``, where the split does not change the step, whole
    questions are balanced instead of single answers, so a prompt runs once per pass); each micro-batch runs as
    passes of like answer lengths cut to their longest answer (``nft.train.plan.answer_passes``).
    ``micro_batch_size`` is then unused. 0: ``micro_batch_size`` answers per micro-batch."""
    max_new_tokens: int = 48
    """response length limit; answers cut there are negative (paper: 3,584 / 14,336)."""
    temperature: float = 1.0
    top_p: float = 1.0
    batch_rule: Literal["auto", "all", "dynamic", "positives"] = "auto"
    """which groups to train on; ``auto`` = the algorithm's own (NFT, DAPO: dynamic sampling; RFT: positives)."""
    max_num_gen_batches: int = 3
    """dynamic sampling: at most this many generation batches per rollout step to collect P mixed groups."""
    gen_batch_prompts: int = 0
    """dynamic sampling: questions per generation batch (0: P). The official code samples 3 x P
    (``train_7B.sh``: gen_prompt_bsz = 1536) and keeps the first P mixed groups."""
    short_batch: Literal["train", "error"] = "train"
    """dynamic sampling that ends with fewer than P mixed groups: ``train`` on those (logged as
    ``rollout/groups_kept``), or ``error`` as the official code (``ray_nft_trainer.py``: ValueError after
    max_num_gen_batches)."""
    grade_truncated: bool = False
    """grade answers cut at ``max_new_tokens`` like the others (the official code) instead of counting them wrong."""
    lr: float = 2e-4
    """the embedded default's (``experiments/sweeps/batch.yaml``, with 128 questions per step; at 16 questions
    5e-4 halved the tiny model's accuracy within 25 steps). The paper presets set 1e-6."""
    warmup_steps: int = 2
    """linear warmup, then constant (as the paper)."""
    warmup_unit: Literal["optimizer", "rollout"] = "optimizer"
    """what ``warmup_steps`` counts: ``optimizer`` steps (factor (s + 1) / warmup at optimizer step s), or
    ``rollout`` steps as the official code (verl's constant schedule with warmup, stepped once per rollout step:
    factor k / warmup for every optimizer step of rollout step k = 0, 1, ..., so the first rollout step runs at lr 0;
    ``fsdp_workers.py``)."""
    dp_reduce: Literal["sum", "mean"] = "sum"
    """how the gradients of data-parallel ranks combine: ``sum`` of the ranks' shares of the mini-batch loss (the
    one-process gradient, whatever the number of processes), or ``mean`` as the official code (each rank's loss is its
    own token sum / 1000 and FSDP averages over ranks: the one-process gradient / world size)."""
    reference_dp: int = 0
    """with ``dp_reduce: mean``, the official run's data-parallel size (7B: 32, 4 nodes x 8 GPUs; 32B: 16, 128 GPUs
    with sequence parallelism 8): each process's gradient is scaled by processes / reference_dp, so a step's gradient
    is the official run's whatever the number of processes here (exactly where the loss is a token sum, NFT and RFT;
    where it sums micro-batch means, ``normalizer: micro_batch``, as closely as the number of micro-batches per
    process scales with its rows). 0: no rescaling."""
    normalizer: Literal["mini_batch", "micro_batch"] = "mini_batch"
    """the reduction's denominator: the whole mini-batch's (split-invariant), or each micro-batch's own with the
    micro-batch losses summed, as verl's token mean in the official code (depends on the micro-batch split)."""
    weight_decay: float = 0.1
    max_prompt_tokens: int = 0
    """drop the training questions whose rendered prompt is longer than this many tokens, before the run (the
    official ``data.filter_overlong_prompts``: 512 for 7B, 2,048 for 32B); 0 keeps them all."""
    decay_1d: bool = False
    """decay the 1-D parameters too (norm weights, biases), as the official code does (verl's AdamW on every
    parameter); False: the usual exemption."""
    grad_clip: float = 1.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    loss: dict[str, dict[str, Any]] = field(default_factory=dict)
    """per-algorithm loss hyperparameter overrides, e.g. ``{nft: {eps: 1.0, omega: one_minus_r}}``."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty buffer in tokens (0: off), applied to GRPO-family rewards."""
    overlong_penalty: float = 1.0
    overlong_scale: str = "unit"
    """the reward scale the overlong penalty is added on: ``unit``, the 0/1 rewards as they are; ``official``, the
    official code's -1/+1 scores (``verifier.py``), so the penalty weighs half as much against correctness here
    (``penalty / 2`` on 0/1 rewards gives the official group-normalised advantages exactly)."""
    val_every: int = 10
    """validation every N rollout steps (and at steps 0 and the last); 0: only at the end."""
    val_benchmarks: list[str] = field(default_factory=lambda: ["synth-easy", "synth-medium", "synth-hard"])
    val_k: int = 4
    val_k_per_benchmark: dict[str, int] = field(default_factory=dict)
    """k for some validation sets (the paper's curves: avg@32 on AIME24/AIME25/AMC23); the others use ``val_k``."""
    val_limit: int = 100
    """questions per validation set (0: all)."""
    val_temperature: float = 1.0
    val_top_p: float = 1.0
    max_skipped_steps: int = 3
    """rollout steps in a row whose every optimizer step was skipped (a non-finite loss or gradient norm) before the
    run stops with its last checkpoint intact."""
    checkpoint_every: int = 10
    """checkpoint every N rollout steps (and at the end)."""
    threads: int = 1
    """CPU threads of each training process; several processes on one machine (a launcher's ranks) share its cores:
    each takes at most cores / processes per node (2 ranks x 2 threads on 2 cores ran 2-7x slower steps here). One
    thread (the default) gives bit-identical runs from process to process; with 2 threads two runs of the same seed
    drifted apart in the 8th digit of the gradient norm after 4 rollout steps. ``make study`` runs two stages at once,
    one thread each."""
    grader: str = "math_verify"
    grader_per_set: dict[str, str] = field(default_factory=dict)
    """the grader of some sets (training set or validation sets) by name, as the official code picks a verifier per
    data source (``verifier.py``); the others use ``grader``."""
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
    push_bucket_mb: float = 64.0
    """ZeRO-3 weight push to the sampler: parameters are gathered a bucket of up to this many MB (full size, in the
    training dtype) at a time, one all-gather per bucket; 0 gathers one parameter at a time."""
    stop_tokens: Literal["chat", "eos"] = "chat"
    """where a sampled answer ends: ``chat``, the tokenizer's eos and Qwen's ``<|im_end|>`` / ``<|endoftext|>``;
    ``eos``, the checkpoint's own eos alone (its generation config), as the official rollout (vLLM's default)."""
    sample_memory_mb: float = 0.0
    """the torch sampler's decoding memory per call (KV cache, mask, the step's vocabulary-sized temporaries): a
    call's prompts go in chunks sized to fit, each answer drawing from its own random stream, so the chunks draw what
    one block would (``nft.rollout.chunks``). 0: one block, one random stream per call (the embedded default's
    draws). Validation samples with the same sampler."""
    logprob_chunk_mb: float = 128.0
    """the trainer's log-prob pass: where its fp32 logits (tokens x vocabulary x 4 bytes) would exceed this many MB,
    the head runs over chunks of tokens this size, each recomputed in the backward pass (``nft.modeling``); peak memory
    a few chunks instead of a few whole logits tensors. 0: never; otherwise at least 64, so that a chunk's tensors
    are above the allocator's mmap threshold and go back to the system when freed."""
    experiment: str = ""
    """MLflow experiment; empty: the study's name (``study.name``)."""
    tracking_uri: str = ""
    """MLflow URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<repository>/mlflow.db (nft.tracking_store.resolve_uri)."""
    tracking: bool = True

    def __post_init__(self):
        if self.mini_batch_prompts == 0:
            self.mini_batch_prompts = self.prompts_per_step
        for name in (
            "steps",
            "prompts_per_step",
            "answers_per_prompt",
            "mini_batch_prompts",
            "micro_batch_size",
            "max_new_tokens",
            "max_num_gen_batches",
            "val_k",
            "threads",
            "grader_workers",
            "max_skipped_steps",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "val_limit"):  # 0: only at the end / every question
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_tokens < 0 or 0 < self.micro_batch_tokens < self.max_new_tokens:
            raise ValueError(
                f"train.micro_batch_tokens ({self.micro_batch_tokens}): expected 0 (micro-batches of "
                f"train.micro_batch_size answers) or at least train.max_new_tokens ({self.max_new_tokens})"
            )
        if self.mini_batch_prompts > self.prompts_per_step:
            raise ValueError(
                f"train.mini_batch_prompts ({self.mini_batch_prompts}) exceeds train.prompts_per_step "
                f"({self.prompts_per_step})"
            )
        if self.answers_per_prompt < 2:
            raise ValueError("train.answers_per_prompt: group statistics need >= 2 answers per question")
        if self.lr <= 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"train.temperature: must be > 0, got {self.temperature}")
        if len(self.adam_betas) != 2:
            raise ValueError("train.adam_betas: expected two numbers")
        self._check_registered()
        self._check_sizes()

    def _check_registered(self) -> None:
        """Losses, their overrides and graders name registered ones; per-benchmark k's are counts."""
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
        for name, g in self.grader_per_set.items():
            try:
                get_grader(g)
            except ValueError as e:
                raise ValueError(f"train.grader_per_set.{name}: {e}") from None
        for name, k in self.val_k_per_benchmark.items():
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"train.val_k_per_benchmark.{name}: expected an integer >= 1, got {k!r}")

    def _check_sizes(self) -> None:
        """Batch, chunk, bucket and scale settings, and the engine's config file."""
        if self.gen_batch_prompts < 0 or (self.gen_batch_prompts and self.gen_batch_prompts < self.prompts_per_step):
            raise ValueError(
                f"train.gen_batch_prompts ({self.gen_batch_prompts}) is below train.prompts_per_step "
                f"({self.prompts_per_step}); 0 means P"
            )
        if self.logprob_chunk_mb != 0 and self.logprob_chunk_mb < 64:
            raise ValueError(
                f"train.logprob_chunk_mb: expected 0 (one pass) or >= 64, got {self.logprob_chunk_mb} (smaller chunks "
                f"fall under the allocator's mmap threshold, nft.cli.MALLOC_THRESHOLDS, and fragment the heap: "
                f"benchmarks/README.md)"
            )
        if self.sample_memory_mb < 0:
            raise ValueError(f"train.sample_memory_mb: expected >= 0 (0: one block), got {self.sample_memory_mb}")
        if self.overlong_scale not in ("unit", "official"):
            raise ValueError(f"train.overlong_scale: expected unit or official, got {self.overlong_scale!r}")
        if self.reference_dp < 0 or (self.reference_dp and self.dp_reduce != "mean"):
            raise ValueError(
                f"train.reference_dp: expected 0 or a positive size with train.dp_reduce mean, got "
                f"{self.reference_dp} with dp_reduce {self.dp_reduce}"
            )
        if self.push_bucket_mb < 0:
            raise ValueError(
                f"train.push_bucket_mb: expected >= 0 (0: one parameter at a time), got {self.push_bucket_mb}"
            )
        if self.engine == "deepspeed" and not self.deepspeed_config:
            raise ValueError("train.deepspeed_config: required when train.engine is deepspeed")
