"""The rollout step's metrics: the policy entropy is the policy's, whatever the algorithm trains on."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nft.modeling import load_policy, response_logprobs
from nft.rollout.base import Rollout
from nft.rollout.torch_sampler import TorchSampler
from nft.train.config import TrainConfig
from nft.train.rollout import collect_rollout
from nft.train.seeds import Cursor
from tests.train.fakes import BoxedOnePool, ChatTokenizer


class _Fixed:
    """A sampler that returns the same answers (two groups of 4: mixed, all wrong) whatever it is asked."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ro = Rollout(
            prompt_ids=[[1, 2]] * 4 + [[3]] * 4,
            response=torch.randint(5, 9, (8, 3), generator=g),
            mask=torch.ones(8, 3),
            logprobs=-torch.rand(8, 3, generator=g),
            finished=torch.ones(8, dtype=torch.bool),
            texts=["\\boxed{1}", "x"] * 2 + ["x"] * 4,
            entropy=torch.rand(8, 3, generator=g),
        )

    def sample(self, prompts, n, **kw):
        return self.ro

    def shard(self, dist):
        return 0, 1, True


def test_policy_entropy_does_not_depend_on_the_batch_rule():
    problems = [SimpleNamespace(question=f"q{i}", answer="1") for i in range(2)]
    cfg = TrainConfig(prompts_per_step=2, answers_per_prompt=4, mini_batch_prompts=1, max_num_gen_batches=1)
    out = {}
    for rule in ("all", "dynamic", "positives"):
        batch, m = collect_rollout(_Fixed(), ChatTokenizer(), problems, Cursor(2, 0), BoxedOnePool(), cfg, rule, 0, 0)
        out[rule] = (m["policy/entropy"], len(batch["rewards"]))
    ent = float(_Fixed().ro.entropy.mean())
    assert all(abs(e - ent) < 1e-6 for e, _ in out.values()), out
    assert [n for _, n in out.values()] == [8, 4, 2]  # the rules kept different rows: the entropy did not move


def test_sampler_entropy_is_the_trainers(tiny_study):
    """The torch sampler's per-token entropy is that of the distribution it draws from: the trainer's pass on the
    same tokens gives the same values (temperature 1)."""
    _, _, base = tiny_study
    model, tok = load_policy(str(base))
    ro = TorchSampler(model, tok).sample(
        ["<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"] * 2, 3, max_new_tokens=8, seed=3
    )
    with torch.no_grad():
        _, ent = response_logprobs(model, ro.prompt_ids, ro.response, ro.mask, tok.pad_token_id, with_entropy=True)
    assert torch.allclose(ro.entropy, ent * ro.mask, atol=1e-5)
