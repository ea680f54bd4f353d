"""The trainer's shared-prefix log-prob pass equals the packed one (values and gradients) and the sampler's
log-probs; the sampler is seeded."""

import torch

from nft.data.prompts import render_prompt
from nft.data.synthetic import SyntheticConfig, build_splits
from nft.modeling import load_policy, response_logprobs
from nft.rollout.torch_sampler import TorchSampler


def test_shared_prefix_equals_packed_and_sampler(tiny_study):
    _, _, base = tiny_study
    model, tok = load_policy(str(base))
    problems = build_splits(SyntheticConfig(families=["add"], tiers=["medium"], train_size=50, eval_size=8))["train"]
    sampler = TorchSampler(model, tok)
    ro = sampler.sample([render_prompt(tok, p.question) for p in problems[:5]], 3, max_new_tokens=16, seed=4)
    # a second prompt order mixes rows of different prompts (non-consecutive sharing)
    perm = torch.tensor([3, 0, 7, 1, 14, 2, 9, 5, 4, 6, 8, 10, 11, 12, 13])
    prompt_ids = [ro.prompt_ids[i] for i in perm.tolist()]
    response, mask = ro.response[perm], ro.mask[perm]
    grads = []
    for shared in (False, True):
        model.zero_grad()
        lp, ent = response_logprobs(model, prompt_ids, response, mask, tok.pad_token_id, with_entropy=True,
                                    shared_prefix=shared)
        (lp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        on = mask > 0
        assert (lp - ro.logprobs[perm])[on].abs().max() < 1e-4
        assert torch.isfinite(ent[on]).all()
    assert (grads[0] - grads[1]).norm() <= 1e-4 * grads[0].norm()
    again = sampler.sample([render_prompt(tok, p.question) for p in problems[:5]], 3, max_new_tokens=16, seed=4)
    assert torch.equal(again.response, ro.response) and again.texts == ro.texts
