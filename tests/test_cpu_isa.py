"""The package pins torch's CPU kernels to AVX2 (nft.pin_cpu_isa): the same seed, the same bits on AVX2 and AVX-512
machines. The cross-machine proof is tests/train/test_loop.py's golden weights (recorded on AVX2 machines, checked
on whatever machine runs the suite); these tests check the mechanism."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from nft import ISA_ENV

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _isa(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ISA_ENV["avx2"] and k != "NFT_CPU_ISA"}
    code = "import nft, torch; torch.ones(4).sum(); print(nft.cpu_isa())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})


def _native() -> str:
    r = _isa(NFT_CPU_ISA="native")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 only")
def test_import_pins_avx2_unless_told_otherwise():
    native = _native()
    if native in ("DEFAULT", "AVX"):
        pytest.skip(f"this CPU has no AVX2 (torch chooses {native})")
    r = _isa()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "AVX2"  # on an AVX-512 machine too (native: AVX512 there)
    r = _isa(ATEN_CPU_CAPABILITY="default")  # a choice the user made is kept
    assert r.stdout.strip() == "DEFAULT", r.stderr


def test_unknown_choice_is_one_clear_error():
    r = _isa(NFT_CPU_ISA="avx9")
    assert r.returncode != 0
    assert "NFT_CPU_ISA" in r.stderr and "avx9" in r.stderr
