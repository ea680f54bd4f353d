"""Training engines (model + optimizer + schedule) and the loop's view of the process group.

Both engines implement the same small interface the loop calls: ``model`` (what forward passes call),
``backward(loss, last)``, ``step() -> grad norm``, ``lr``, ``rollout_weights()`` (what the sampler loads),
``save_model(dir, tokenizer)``, ``save_state(dir) -> dict``, ``load_state(dir, state)``.

- :class:`TorchEngine`: one process, AdamW, linear warmup then constant lr, gradient-norm clipping.
- :class:`DeepSpeedEngine`: the same optimizer and schedule under DeepSpeed ZeRO (stage 2 or 3) across the
  processes of a launcher (``deepspeed``, ``torchrun``). The loop marks each mini-batch's last micro-batch as
  DeepSpeed's accumulation boundary (``set_gradient_accumulation_boundary``), because a mini-batch holds a varying
  number of micro-batches (dynamic sampling, RFT's positives); forward passes go through the DeepSpeed engine.

Data parallelism, written once in the loop: every rank samples and grades its share of the questions, the kept
groups' metadata is gathered so every rank knows the same mini-batches and normalisers, and each rank receives and
trains on rows ``rank::world`` of every mini-batch only. Each rank's loss is its share of the mini-batch loss, so
the gradient is the *sum* over ranks; DeepSpeed averages over ranks, hence ``backward`` scales by the world size.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from ..dist import Dist
from .config import TrainConfig


class Engine(Protocol):
    """What the loop uses of a training engine (model + optimizer + schedule)."""

    model: Any
    """what forward passes call (the module, or DeepSpeed's engine wrapping it)."""
    dist: Dist
    dtype: torch.dtype
    """the trainer's weights' dtype (a sampler's full copy is loaded in it)."""
    discards_early: bool
    """True: the loop drops a mini-batch at its first non-finite loss (:meth:`discard`, one process); False: the
    non-finite loss is back-propagated and :meth:`step` skips the step on every rank together (DeepSpeed: the global
    gradient norm is non-finite on all ranks when it is on one)."""

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Accumulate the gradient of ``loss``; ``last``: the mini-batch's last micro-batch."""

    def step(self) -> float | None:
        """Clip, apply the optimizer and the schedule, zero the gradients; returns the gradient norm (None: not
        measured). A non-finite gradient norm is not applied: the gradient is dropped, the optimizer and the schedule
        do not move, and the norm is returned for the loop to count."""

    def discard(self) -> None:
        """Drop the accumulated gradient without a step (a mini-batch with a non-finite loss; ``discards_early``)."""

    @property
    def lr(self) -> float: ...

    def rollout_weights(self) -> torch.nn.Module | Callable[[], Iterable[tuple[str, torch.Tensor]]]:
        """What the sampler loads: the trainer's own module, or a gather of the full weights, ``(name, tensor)``
        pairs bucket by bucket (a collective)."""

    def save_model(self, path: Path, tokenizer) -> None: ...

    def save_state(self, path: Path) -> dict: ...

    def load_state(self, path: Path, state: dict) -> None: ...


# ----------------------------------------------------------------------------------------------------------------------
# Process group (Dist, launched_world_size: nft.dist)
# ----------------------------------------------------------------------------------------------------------------------
def init_distributed(engine: str) -> Dist:
    """Join the launcher's process group (DeepSpeed engine: NCCL on GPUs, gloo on CPU); a lone process gets a group
    of one so DeepSpeed can start without a launcher."""
    if engine != "deepspeed":  # one process (nft.train.run.check_backends refuses a launcher's several)
        return Dist()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # no launcher: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return Dist()


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule (shared by both engines so they take the same steps)
# ----------------------------------------------------------------------------------------------------------------------
def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on the matrices, and on the 1-D parameters too with ``train.decay_1d``."""
    decay = [p for p in model.parameters() if p.dim() >= 2 or cfg.decay_1d]
    no_decay = [p for p in model.parameters() if p.dim() < 2 and not cfg.decay_1d]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],  # an empty group is left out
        lr=cfg.lr,
        betas=cast("tuple[float, float]", tuple(cfg.adam_betas)),  # two numbers, checked by TrainConfig
    )


def lr_factor(cfg: TrainConfig):
    """The lr multiplier at optimizer step ``s`` (0, 1, ...): linear warmup over ``warmup_steps`` optimizer steps
    ((s + 1) / warmup), or over rollout steps as the official code (k / warmup for every optimizer step of rollout step
    k, so rollout step 0 trains at lr 0; ``train.warmup_unit``), then constant."""
    warm = max(cfg.warmup_steps, 0)
    if not warm:
        return lambda s: 1.0
    if cfg.warmup_unit == "rollout":
        per_rollout = math.ceil(cfg.prompts_per_step / cfg.mini_batch_prompts)
        return lambda s: min(1.0, (s // per_rollout) / warm)
    return lambda s: min(1.0, (s + 1) / warm)


def loss_factor(cfg: TrainConfig, world: int) -> float:
    """What each process's loss is multiplied by before its backward pass. DeepSpeed averages the processes'
    gradients: ``dp_reduce: sum`` multiplies by the world size (the one-process gradient); ``mean`` keeps the share
    as it is (the official code), and with ``reference_dp`` rescales it to that many processes' average."""
    if cfg.dp_reduce == "sum":
        return float(world)
    return world / cfg.reference_dp if cfg.reference_dp else 1.0


def make_schedule(opt, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))


def _save_pretrained(model, path: Path, tokenizer, state_dict=None) -> None:
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


class TorchEngine:
    """Single-process training engine: AdamW, linear warmup then constant lr, gradient-norm clipping."""

    def __init__(self, model, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.dist = Dist()
        self.dtype = next(model.parameters()).dtype
        self.discards_early = True
        self.opt = make_optimizer(model, cfg)
        self.sched = make_schedule(self.opt, cfg)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        factor = loss_factor(self.cfg, 1)
        (loss * factor if factor != 1.0 else loss).backward()

    def step(self) -> float:
        """Clip and apply the accumulated gradient; a non-finite gradient norm is not applied (the gradient is
        dropped, the optimizer and schedule do not move) and the norm is returned for the loop to count."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if torch.isfinite(norm):
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def discard(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def rollout_weights(self):
        return self.model

    def save_model(self, path: Path, tokenizer) -> None:
        _save_pretrained(self.model, path, tokenizer)

    def save_state(self, path: Path) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state(self, path: Path, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------------------------------
class DeepSpeedEngine:
    """DeepSpeed ZeRO training engine with the loop's AdamW and schedule (see the module docstring)."""

    def __init__(self, model, cfg: TrainConfig, ds_config: dict):
        import deepspeed

        self.cfg = cfg
        self.dist = Dist()
        opt = make_optimizer(model, cfg)
        self.ds, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config, lr_scheduler=lambda o: make_schedule(o, cfg)
        )
        # forward passes go through the DeepSpeed engine: its forward advances ZeRO's micro-step counter, without
        # which ZeRO-3 overwrites (instead of adding) the gradients of a mini-batch's earlier micro-batches
        self.model = self.ds
        self.module = self.ds.module
        self.stage = self.ds.zero_optimization_stage()
        self.dtype = torch.bfloat16 if self.ds.bfloat16_enabled() else torch.float32
        self.discards_early = False

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # ``last``: the mini-batch's last micro-batch (DeepSpeed's accumulation boundary). DeepSpeed averages
        # gradients over ranks; the loop's losses are shares of a sum, hence the factor.
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * loss_factor(self.cfg, self.dist.world), scale_wrt_gas=False)

    def discard(self) -> None:
        raise RuntimeError("internal: DeepSpeedEngine skips a non-finite step in step() (discards_early is False)")

    def step(self) -> float | None:
        """DeepSpeed's step. ZeRO-2/3 compute the global gradient norm over all ranks first; where it is not finite
        they drop the gradient and apply neither the optimizer nor the schedule (fp16's overflow path, which bf16 and
        fp32 take too), and the norm comes back as inf for the loop to count. None where DeepSpeed does not report a
        norm (not measured, not non-finite)."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full weights as ``(name, tensor)`` pairs, every name of a tied parameter included (a collective under
        ZeRO-3: all ranks iterate to the end). ZeRO-3 gathers them in buckets of at most ``train.push_bucket_mb`` (a
        larger parameter alone), one all-gather per bucket; a pair stays valid until the next bucket is reached, so
        a consumer copies it where it goes (the sampler's module, vLLM's) and at most one bucket is gathered at a
        time. ZeRO-2: the module's own tensors, nothing gathered or copied."""
        if self.stage < 3:
            yield from self.module.state_dict().items()
            return
        import deepspeed

        limit = self.cfg.push_bucket_mb * 2**20
        # every name of a tied parameter (lm_head.weight = embed_tokens.weight): vLLM's in-place reload leaves a
        # module it receives no weight for at its old values (measured: log-probs off by 0.5 without lm_head.weight)
        names: dict[int, list[str]] = {}
        params: list[torch.nn.Parameter] = []
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) not in names:
                names[id(p)] = []
                params.append(p)
            names[id(p)].append(name)
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p in [*params, None]:
            nbytes = 0 if p is None else getattr(p, "ds_numel", p.numel()) * p.element_size()
            if bucket and (p is None or size + nbytes > limit):
                with deepspeed.zero.GatheredParameters(bucket, modifier_rank=None):
                    for q in bucket:
                        for name in names[id(q)]:
                            yield name, q.detach()
                bucket, size = [], 0
            if p is not None:
                bucket.append(p)
                size += nbytes
        keys = set(self.module.state_dict())
        for name, b in self.module.named_buffers():
            if name in keys:
                yield name, b.detach()

    def rollout_weights(self):
        """ZeRO-3: the module's parameters are shards, samplers get :meth:`iter_weights` (run on every rank);
        ZeRO-2: the module."""
        return self.iter_weights if self.stage == 3 else self.module

    def save_model(self, path: Path, tokenizer) -> None:
        """``save_pretrained`` of the full weights by rank 0 (collective under ZeRO-3: the other ranks take part in
        the gathers and keep nothing)."""
        sd = None
        if self.stage == 3:
            pairs = self.iter_weights()
            if self.dist.is_main:
                sd = {name: t.cpu().clone() for name, t in pairs}
            else:
                for _ in pairs:
                    pass
        if self.dist.is_main:
            _save_pretrained(self.module, path, tokenizer, state_dict=sd)
        self.dist.barrier()

    def save_state(self, path: Path) -> dict:
        """Optimizer, schedule and ZeRO partitions under ``path/deepspeed`` (every rank writes its shards)."""
        self.ds.save_checkpoint(str(Path(path) / "deepspeed"), tag="state", save_latest=False)
        return {"world": self.dist.world}

    def load_state(self, path: Path, state: dict) -> None:
        """The checkpoint's DeepSpeed state; written by another number of processes, its universal conversion (the
        engine was built with ``checkpoint.load_universal``: :func:`nft.train.ds_config.resume_config`)."""
        tag = "state" if state.get("world") in (None, self.dist.world) else "universal"
        self.ds.load_checkpoint(str(Path(path) / "deepspeed"), tag=tag, load_module_strict=False)
