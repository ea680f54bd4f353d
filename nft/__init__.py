"""NFT study platform: Negative-aware Fine-Tuning vs GRPO, Dr.GRPO, DAPO and RFT on math reasoning.

Importing the package pins the CPU instruction set of torch's kernels to AVX2 on x86-64 (see :func:`pin_cpu_isa`):
the same seed gives the same weights on an AVX-512 machine as on an AVX2 one. ``NFT_CPU_ISA=native`` opts out.
"""

import os
import platform

__version__ = "0.1.0"

#: The environment that selects the instruction set of each CPU kernel library torch uses: ATen's own vectorised
#: kernels (softmax, norms, reductions, the optimizer's element-wise updates), MKL's BLAS and oneDNN.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def pin_cpu_isa() -> dict[str, str]:
    """Pin torch's CPU kernels to one instruction set so that a seed gives the same bits on every x86-64 machine of
    one CPU vendor (:func:`cpu_vendor`: MKL's code paths still differ between vendors).

    Why: 2,700 pretraining steps turn a last-bit rounding difference into another base model, and ATen dispatches its
    AVX-512 kernels where the processor has them, whose rounding differs from AVX2's; pinned, AVX-512 and AVX2
    machines give the same weights, in the same time (docs/pipeline.md, "Reproducing"). ``NFT_CPU_ISA`` (default
    ``avx2``; ``native``: leave torch's choice) selects it; a variable the user set already is kept. Effective only before torch runs its first kernel in the process, which is
    why the package does it on import; the run records the instruction set actually used (tag ``cpu_isa``).
    Returns the variables it set. x86-64 only (elsewhere nothing is set).
    """
    choice = os.environ.get("NFT_CPU_ISA", "avx2").lower()
    if choice not in ISA_ENV and choice != "native":
        raise ValueError(f"NFT_CPU_ISA: expected one of {sorted(ISA_ENV) + ['native']}, got {choice!r}")
    if choice == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    set_now = {k: v for k, v in ISA_ENV[choice].items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


def cpu_vendor() -> str:
    """``AuthenticAMD``, ``GenuineIntel``, ... (``unknown`` off Linux). MKL, which computes torch's matrix products on
    x86-64, takes other code paths on each vendor's processors: one seed and instruction set give the same bits on
    one vendor's machines, not across vendors (the recorded studies and golden weights are kept per vendor)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_isa() -> str:
    """The instruction set torch's ATen kernels use in this process (``AVX2``, ``AVX512``, ``DEFAULT``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


pin_cpu_isa()
