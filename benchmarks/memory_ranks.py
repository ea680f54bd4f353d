"""Benchmark: host memory per rank of the ZeRO-3 path, a random Qwen2.5-0.5B-shaped model under 2 CPU ranks.

    python benchmarks/memory_ranks.py [--nft PATH] [--label after] [--zero KEY=VALUE ...] [--train KEY=VALUE ...]
        [--inside] [--glibc-heap] [--dir D] [--json F]

Builds (once, under ``--dir``) a random model with Qwen2.5-0.5B's configuration (494 M parameters, vocabulary
151,936, tied embeddings) and a local tokenizer and data (``scripts/gpu_smoke.py``), then launches ``nft``'s training
loop on 2 ranks (``deepspeed --num_gpus 2``, DeepSpeed ZeRO-3 in bf16, the torch sampler) for 2 rollout steps of 2
questions x 4 answers x 48 tokens (a random model never stops). ``--nft PATH``: the ``nft`` package of another checkout (a git worktree of an
earlier commit: the "before" of benchmarks/README.md); its defaults run (the settings this script passes exist in
both).

Each rank measures its own resident memory with the kernel's high-water mark (``/proc/self/clear_refs`` reset before
a phase, after ``malloc_trim`` has returned the heap's free pages, ``VmHWM`` after it), around the loop's own calls:
- **load**: the process's peak from its start to its first measured call (model loaded and partitioned, engine,
  sampler and its full copy of the weights);
- **push**: each weight push into the sampler (``update_weights``), over the memory before it;
- **sample** and **update** (the log-prob passes and the optimizer step): each call, over the memory before it;
  a rollout step is one of each. ``--inside``: instead of the whole update, each of its log-prob passes, backward
  and optimizer step (``logprobs``, ``backward``, ``step``).

The ranks run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): each tensor's memory is mapped
and unmapped with it, so resident memory follows the live tensors, as ``torch.cuda.max_memory_allocated`` does on a
GPU. With glibc's own setting the threshold grows up to 32 MiB as blocks are freed, and freed blocks stay in its heaps,
fragmented, counted as resident (``--glibc-heap``: measure that way).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 2**30


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Phase:
    """Peak resident memory over a block (the kernel's high-water mark, reset at entry)."""

    #: the process's peak before the first measured call (its set-up: model, engine, sampler and its copy)
    load_peak: int | None = None

    def __enter__(self):
        if Phase.load_peak is None:
            Phase.load_peak = _status("VmHWM")
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the heap's free pages back to the kernel: "before" is what lives
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM")
        self.over = self.peak - self.before


def _measured(real, record: list, label: str):
    """``real`` with each call measured as phase ``label`` into ``record``."""

    def measured(*a, **k):
        with Phase() as p:
            out = real(*a, **k)
        record.append({"phase": label, "before": p.before, "peak": p.peak, "over": p.over})
        return out

    return measured


def _wrap(cls, name: str, record: list, label: str) -> None:
    """Measure each call of method ``cls.name``."""
    setattr(cls, name, _measured(getattr(cls, name), record, label))


def _replace(record: list, real, label: str) -> None:
    """Measure each call of function ``real`` as phase ``label``, in every ``nft`` module that imported it by name."""
    measured = _measured(real, record, label)
    for m in list(sys.modules.values()):
        for name, value in list(vars(m).items()) if getattr(m, "__name__", "").startswith("nft") else ():
            if value is real:
                setattr(m, name, measured)


def _settings(items: list[str]) -> dict:
    """``KEY=VALUE`` command-line items as a dict, each value read as JSON."""
    return {key: json.loads(value) for key, _, value in (item.partition("=") for item in items)}


def _measure_inside(record: list) -> None:
    """``--inside``: the update's parts instead of the whole update: each log-prob pass, backward and optimizer step."""
    from nft.train.engines import DeepSpeedEngine

    _wrap(DeepSpeedEngine, "backward", record, "backward")
    _wrap(DeepSpeedEngine, "step", record, "step")
    import nft.modeling

    _replace(record, nft.modeling.response_logprobs, "logprobs")


def worker(args) -> None:
    """One rank (under the launcher): the loop with its calls measured; writes ``rank{r}.json``."""
    import dataclasses

    import torch

    import nft.train.run as run_mod
    from nft.rollout.torch_sampler import TorchSampler
    from nft.train.config import TrainConfig

    record: list[dict] = []
    _wrap(TorchSampler, "sample", record, "sample")
    _wrap(TorchSampler, "update_weights", record, "push")
    if args.inside:
        _measure_inside(record)
    else:
        import nft.train.update

        _replace(record, nft.train.update.update, "update")
    torch.set_num_threads(1)
    d = Path(args.dir)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = dict(
        model=str(d / "model"),
        data=str(d / "data"),
        steps=2,
        prompts_per_step=2,
        answers_per_prompt=4,
        mini_batch_prompts=2,
        micro_batch_size=4,
        max_new_tokens=48,
        batch_rule="all",
        lr=1e-6,
        val_every=0,
        val_benchmarks=["synth-easy"],
        val_k=1,
        val_limit=4,
        checkpoint_every=100,
        threads=1,
        grader="dapo",
        grader_workers=1,
        tracking=False,
        engine="deepspeed",
        deepspeed_config=str(d / f"zero3-bf16-{args.label}.json"),
        sampler="torch",
        gradient_checkpointing=True,  # as the paper presets train
    )
    settings.update(_settings(args.train))
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in fields})
    t0 = time.perf_counter()
    run_mod.run_training(cfg, "nft", 0, d / f"run-{args.label}", progress=False, arm="nft")
    rank = int(os.environ.get("RANK", "0"))
    out = {"rank": rank, "load_peak": Phase.load_peak, "calls": record, "seconds": time.perf_counter() - t0}
    (d / f"{args.label}-rank{rank}.json").write_text(json.dumps(out))
    import torch.distributed as td

    td.barrier()
    td.destroy_process_group()
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_{rank}"):
        f.unlink(missing_ok=True)  # DeepSpeed's CPU collectives leave their shared-memory buffer behind


def build(d: Path, nft: str, label: str, zero: list[str]) -> None:
    """The random 0.5B-shaped model, its tokenizer and data (once), and ZeRO-3 in bf16 with ``zero``'s
    ``KEY=VALUE`` settings of its ``zero_optimization`` section."""
    if not (d / "model" / "config.json").is_file():
        sys.path.insert(0, str(REPO / "scripts"))
        import torch
        from gpu_smoke import QWEN25_05B
        from gpu_smoke import build as build_model

        torch.manual_seed(0)
        build_model(d, QWEN25_05B)
    ds = json.loads((Path(nft) / "experiments/deepspeed/zero3.json").read_text())  # the measured checkout's own
    ds["bf16"] = {"enabled": True}
    ds["zero_optimization"].update(_settings(zero))
    (d / f"zero3-bf16-{label}.json").write_text(json.dumps(ds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nft", default=str(REPO), help="the checkout whose nft package runs (default: this one)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "nft-memory-ranks"))
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--zero", action="append", default=[], metavar="KEY=VALUE", help="a zero_optimization setting (JSON value)"
    )
    ap.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="a train setting (JSON value)")
    ap.add_argument("--inside", action="store_true", help="measure the update's log-prob passes, backward and step")
    ap.add_argument("--glibc-heap", action="store_true", help="leave glibc's mmap threshold as it is (see above)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, args.nft)
        worker(args)
        return 0
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    build(d, args.nft, args.label, args.zero)
    shutil.rmtree(d / f"run-{args.label}", ignore_errors=True)  # a finished run would not train again
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": args.nft}
    # the processor's own bf16 kernels (nft pins AVX2 for bit-equal weights across machines; there bf16 matmuls are
    # emulated, many times slower); the memory figures do not depend on it
    env.setdefault("NFT_CPU_ISA", "native")
    if not args.glibc_heap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    launcher = str(Path(sys.executable).parent / "deepspeed")
    with socket.socket() as sock:  # a free port for the launcher's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = (
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            __file__,
            "--worker",
            "--nft",
            args.nft,
            "--label",
            args.label,
            "--dir",
            args.dir,
        ]
        + ["--inside"] * args.inside
        + [f"--train={t}" for t in args.train]
    )
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(d / f"run-{args.label}", ignore_errors=True)  # its checkpoint: 8 GB
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    ranks = [json.loads((d / f"{args.label}-rank{i}.json").read_text()) for i in range(2)]
    commit = subprocess.run(["git", "-C", args.nft, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(
        f"memory per rank, {args.label} (nft at {commit.stdout.strip()}): 2 ZeRO-3 CPU ranks, bf16, Qwen2.5-0.5B shape"
        + (", glibc's heap" if args.glibc_heap else "")
    )
    for res in ranks:
        calls = res["calls"]
        print(f"  rank {res['rank']}: load peak {res['load_peak'] / GB:.2f} GB ({res['seconds']:.0f} s in all)")
        for phase in ("sample", "update", "logprobs", "backward", "step", "push"):
            mine = [c for c in calls if c["phase"] == phase]
            if not mine:
                continue
            print(
                f"    {phase:6s} by call: over the memory before "
                + ", ".join(f"{c['over'] / GB:.2f}" for c in mine)
                + " GB; peak "
                + ", ".join(f"{c['peak'] / GB:.2f}" for c in mine)
                + " GB"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"label": args.label, "commit": commit.stdout.strip(), "ranks": ranks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
