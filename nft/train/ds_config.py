"""The DeepSpeed JSON, resolved against the train config before any model loads (``"auto"`` entries filled, every
contradiction one error naming both fields), and the resume of a checkpoint written by another number of processes
(DeepSpeed's universal checkpoint)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..modeling import load_policy
from .config import TrainConfig


def resolve_deepspeed_config(path: str, cfg: TrainConfig, world: int, model: dict | None = None) -> dict:
    """Read the DeepSpeed JSON and fill its ``"auto"`` entries from the train config and the model's ``config.json``
    (``model``, :func:`model_config`); any number that contradicts the train config raises one error naming both
    fields. Runs before any model loads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {path}: file not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"train.deepspeed_config: {path}: not valid JSON ({e})") from None
    where = f"train.deepspeed_config ({path})"
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ValueError(
                f'{where}: remove "{key}": the loop owns AdamW and the warmup schedule '
                f"(train.lr, train.warmup_steps, train.weight_decay, train.adam_betas)"
            )
    if cfg.prompts_per_step % world:
        raise ValueError(
            f"train.prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of "
            f"training processes ({world})"
        )
    _fill_batch_sizes(ds, cfg, world, where)
    for half in ("bf16", "fp16"):
        if isinstance(ds.get(half), dict) and ds[half].get("enabled") == "auto":
            ds[half]["enabled"] = half == "bf16" and torch.cuda.is_available()
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(
            f"{where}: fp16 is not supported (its loss scaling breaks the exact micro-batch sums); use bf16"
        )
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("check_grad_overflow") is False:
        raise ValueError(
            f"{where}: bf16.check_grad_overflow must stay true: ZeRO skips a step whose gradient is not finite "
            "on any rank, as the torch engine does"
        )
    _fill_zero(ds, where, model or {})
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ValueError(f'{where}: no value to fill "auto" with for {leftover}')
    return ds


def _fill_batch_sizes(ds: dict, cfg: TrainConfig, world: int, where: str) -> None:
    """DeepSpeed's batch sizes and clipping from the train section (``"auto"``), or one error where they contradict."""
    micro = cfg.micro_batch_size
    per_rank = math.ceil(cfg.mini_batch_prompts * cfg.answers_per_prompt / world)
    gas = max(1, math.ceil(per_rank / micro))
    derived = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": cfg.grad_clip,
    }
    source = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "ceil(train.mini_batch_prompts * train.answers_per_prompt / processes "
        "/ train.micro_batch_size)",
        "train_batch_size": "train.micro_batch_size * gradient_accumulation_steps * processes",
        "gradient_clipping": "train.grad_clip",
    }
    for key, value in derived.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(
                f"{where}: {key} is {given} but the train config gives {value} ({source[key]} with "
                f'{world} process(es)); set it to "auto" or change the train section'
            )
        ds[key] = value


def _fill_zero(ds: dict, where: str, model: dict) -> None:
    """The ZeRO section: stage 2 or 3; its ``"auto"`` sizes from the model's shape: buckets from the hidden size
    ``h`` (as transformers fills them), the parameters ZeRO-3 keeps gathered from a decoder layer's."""
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise ValueError(
            f"{where}: zero_optimization.stage must be 2 or 3, got {stage} (ZeRO-2/3's optimizer detects a "
            "non-finite gradient and skips the step on every rank)"
        )
    h = model.get("hidden_size", 1024)
    # Gathered parameters kept live (prefetched ahead, or kept for a reuse within the distance): 2 decoder layers.
    # DeepSpeed's 1e9 is 2 layers of a 32B model, 4 of a 7B model and a whole 0.5B model, which its prefetcher then
    # holds gathered from the forward to the backward. 2 layers still span a layer's recomputed forward and its
    # backward (gradient checkpointing), so the backward does not gather it again.
    live = 2 * layer_parameters(model) if "intermediate_size" in model else 10**9
    for key, value in (
        ("reduce_bucket_size", h * h),
        ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
        ("stage3_param_persistence_threshold", 10 * h),
        ("stage3_max_live_parameters", live),
        ("stage3_max_reuse_distance", live),
    ):
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # the client AdamW on offloaded states


def layer_parameters(model: dict) -> int:
    """Parameters of one decoder layer of a Qwen2/Llama-shaped ``config.json``: attention (grouped key/value
    heads) and the gated MLP; biases and norms are too small to count."""
    h = model["hidden_size"]
    heads = model.get("num_attention_heads", 1)
    head_dim = model.get("head_dim") or h // heads
    kv = model.get("num_key_value_heads") or heads
    return 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * model["intermediate_size"]


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def model_config(model_dir: str) -> dict | None:
    """The model folder's ``config.json`` (None where there is none: the ``"auto"`` sizes then take defaults)."""
    f = Path(model_dir) / "config.json"
    if f.is_file():
        return json.loads(f.read_text())
    return None


def universal_command(ckpt: Path) -> str:
    """The one command that converts checkpoint folder ``ckpt``'s DeepSpeed state to a universal checkpoint (any
    number of processes can resume from it)."""
    return (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt}/deepspeed/state "
        f"--output_folder {ckpt}/deepspeed/universal"
    )


def resume_config(ckpt: Path, ds: dict, world: int) -> dict:
    """The DeepSpeed config to resume checkpoint folder ``ckpt`` with ``world`` processes: ``ds`` itself where the
    checkpoint was written by as many; where by another number, ``ds`` loading its universal conversion
    (``ckpt/deepspeed/universal``), or one error giving the command that makes it. Runs before any model loads."""
    written = torch.load(ckpt / "state.pt", weights_only=False)["engine"].get("world")
    if written in (None, world):
        return ds
    if not (ckpt / "deepspeed" / "universal").is_dir():
        raise ValueError(
            f"checkpoint {ckpt} was written by {written} processes and this run has {world}: resume it with "
            f"{written}, or convert it once to DeepSpeed's universal checkpoint and rerun the same command:\n"
            f"  {universal_command(ckpt)}"
        )
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def load_policy_for(source: str, ds_config: dict | None):
    """The policy in the dtype it trains in: float32 for the torch engine; under DeepSpeed its config's (bf16 weights
    are what DeepSpeed casts them to anyway), and under ZeRO-3 partitioned as it loads (``HfDeepSpeedConfig``: each
    rank materialises its shard, not a full copy)."""
    if ds_config is None:
        return load_policy(source)
    dtype = torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") else torch.float32
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage < 3:
        return load_policy(source, dtype)
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)  # while it lives, from_pretrained loads under deepspeed.zero.Init
    try:
        return load_policy(source, dtype)
    finally:
        del keep
