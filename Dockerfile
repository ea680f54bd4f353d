# A GPU image for the paper presets (experiments/paper-7b.yaml, paper-32b.yaml, small-1gpu.yaml).
#   docker build -t nft-study .
#   docker run --gpus all --ipc=host -v $PWD/models:/workspace/nft/models -v $PWD/benchmarks-data:/data nft-study \
#     bash -c "nft compose experiments/small-1gpu.yaml --out params.yaml --set study.benchmarks_dir=/data && nft check --config params.yaml && dvc repro"
# The pins are pyproject.toml's: torch 2.13.0 (PyPI's wheel is built for CUDA 13 and brings its own CUDA runtime; the
# host's NVIDIA driver must support CUDA 13) and vllm 0.32.0, which requires exactly that torch. The devel image gives
# DeepSpeed the compiler for the ops it builds on first use (fused Adam). tests/test_dockerfile.py keeps these lines
# equal to pyproject.toml.
ARG BASE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
        build-essential ninja-build pdsh openssh-client && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /workspace/nft
COPY pyproject.toml README.md ./
COPY nft nft
COPY analysis analysis
RUN pip install --upgrade pip && pip install torch==2.13.0 && pip install -e '.[vllm,deepspeed]'
COPY . .
RUN git init -q 2>/dev/null || true
