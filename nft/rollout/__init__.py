"""Rollout backends behind one protocol (:class:`nft.rollout.base.Sampler`) and the one factory that builds them for
training and for ``nft evaluate``: ``torch`` (:mod:`nft.rollout.torch_sampler`) or ``vllm``
(:mod:`nft.rollout.vllm_sampler`)."""

from __future__ import annotations

from typing import Any

from .base import Rollout, Sampler


def make_sampler(
    kind: str,
    model_dir: str,
    tokenizer,
    *,
    seed: int = 0,
    vllm: dict[str, Any] | None = None,
    section: str = "train",
    weights=None,
    dtype=None,
    memory_mb: float = 0,
    stops: str = "chat",
) -> Sampler:
    """A ``kind`` sampler on the model in ``model_dir``.

    ``weights``: what to sample from instead of the folder's weights (the training engine's ``rollout_weights()``):
    the trainer's own module (the torch sampler then shares it: nothing is copied), or a state dict or a gather
    returning one, loaded into the sampler's model. ``dtype``: the torch sampler's copy (default float32); ``memory_mb``:
    its decoding memory budget per call (0: one block); ``stops``: where answers end
    (:func:`nft.modeling.stop_token_ids`). vLLM checks its options and devices (naming ``section``)
    before loading anything."""
    import torch

    if kind == "torch":
        from ..modeling import load_policy
        from .torch_sampler import TorchSampler

        if isinstance(weights, torch.nn.Module):
            return TorchSampler(weights, tokenizer, memory_mb=memory_mb, stops=stops)
        model, _ = load_policy(model_dir, dtype=dtype or torch.float32)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sampler: Sampler = TorchSampler(model.to(device), tokenizer, memory_mb=memory_mb, stops=stops)
    elif kind == "vllm":
        from .vllm_sampler import VLLMSampler

        sampler = VLLMSampler(model_dir, tokenizer, seed=seed, options=vllm, section=section, stops=stops)
    else:
        raise ValueError(f"{section}.sampler: expected torch or vllm, got {kind!r}")
    if weights is not None:
        sampler.update_weights(weights)
    return sampler


__all__ = ["Rollout", "Sampler", "make_sampler"]
