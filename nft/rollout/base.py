"""The sampler protocol shared by the torch and vLLM backends.

A sampler turns P prompts into P x n answers (rows ``i * n .. i * n + n - 1`` answer prompt ``i``) and returns the
token ids with their log-probs under the sampling distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    """P x n sampled answers.

    Attributes:
        prompt_ids: per row, the prompt's token ids (repeated n times per prompt).
        response: ``[B, T]`` sampled ids (padding after the end, ``T`` = longest answer).
        mask: ``[B, T]`` float, 1 on generated tokens (the stop token included).
        logprobs: ``[B, T]`` float, log-probs of the sampled tokens under the sampler (0 on padding).
        finished: ``[B]`` bool, the answer ended with a stop token (False: cut at the length limit).
        texts: decoded answers (special tokens dropped).
        entropy: ``[B, T]`` float, the entropy of the sampling distribution at each generated token (0 on padding);
            None where the backend does not give it (vLLM): then ``-logprobs`` estimates it (its expectation).
    """

    prompt_ids: list[list[int]]
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor
    texts: list[str]
    entropy: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1).long()

    def entropy_sum(self) -> float:
        """The policy's entropy summed over every generated token (exact, or the ``-logprobs`` estimate)."""
        return float((self.entropy if self.entropy is not None else -self.logprobs * self.mask).sum())

    def __len__(self) -> int:
        return len(self.prompt_ids)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout of ``parts`` in order (the per-token tensors right-padded to the longest answer)."""
    T = max(p.response.shape[1] for p in parts)

    def cat(ts: list[torch.Tensor], fill) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill) for t in ts])

    return Rollout(
        prompt_ids=[ids for p in parts for ids in p.prompt_ids],
        response=cat([p.response for p in parts], pad_id),
        mask=cat([p.mask for p in parts], 0.0),
        logprobs=cat([p.logprobs for p in parts], 0.0),
        finished=torch.cat([p.finished for p in parts]),
        texts=[t for p in parts for t in p.texts],
        entropy=None if any(p.entropy is None for p in parts) else cat([p.entropy for p in parts], 0.0),  # type: ignore[misc]
    )


class Sampler(Protocol):
    """What the loop and ``nft evaluate`` use of a rollout backend."""

    def sample(
        self,
        prompts: list[str],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Rollout: ...

    seeds_per_prompt: bool
    """True: prompt ``i`` of a call is sampled with seed ``seed + i * n`` alone (vLLM's per-request seeds), so the
    answers do not depend on which prompts share a call; False: one random stream per call (the torch sampler)."""

    def update_weights(self, weights) -> None:
        """Make the sampler use the trainer's current weights: a module, a state dict, or a zero-argument callable
        returning ``(name, tensor)`` pairs (a gather that every rank runs)."""
        ...

    def shard(self, dist) -> tuple[int, int, bool]:
        """``(index, count, leader)`` of this process's share of the questions: one share per process, except an
        engine spanning several processes (vLLM tensor parallel), whose processes sample one share together and
        whose first process (the leader) reports it."""
        ...

    def sleep(self) -> None:
        """Free the device memory the sampler holds while the trainer works (vLLM sleep mode; else nothing)."""
        ...
