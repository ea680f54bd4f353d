"""Benchmark: how much of the torch sampler's decoding is framework overhead, and what a leaner decoding step would
buy, on the rollout-step benchmark's workloads (``rollout_step.py``: random Qwen2, 2 CPU threads).

The same ``TorchSampler`` runs its decoding steps four ways on the same weights, alternated within each run:

- ``transformers``: the model's own forward (what the sampler does);
- ``minimal``: a hand-written Qwen2 decoding step (embedding, RMSNorm, rotary with the model's own tables, the
  sampler's attention on the slab cache, MLP, head) with transformers' exact operations, so tokens and log-probs
  must equal bit for bit (checked); the difference is the modules' Python and dispatch overhead;
- ``fused``: the minimal step with q/k/v and gate/up projections each as one matrix product (rotary on q and k at
  once); bit for bit too on this machine (checked; matrix products of concatenated weights need not round alike
  elsewhere);
- ``fused + cascade``: the same with the prompts read once per prompt (``TorchSampler(cascade=True)``; log-probs
  equal to rounding, reported).

It then profiles one ``transformers`` sampling call by operator (share of attention, matrix products, the rest).
Measurement only: the minimal step is not used by the sampler (README "Speed" says why).

    python benchmarks/decode_forward.py [--workloads small,large] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rollout_step  # noqa: E402  (the workloads and their models)

THREADS = rollout_step.THREADS


def _rms(x, norm):
    dt = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dt)


class MinimalDecoder:
    """Routes the sampler's decoding steps (those that pass a prepared mask dict) through a hand-written Qwen2 step;
    everything else (prefill, attributes) goes to the model."""

    def __init__(self, model, fused: bool):
        self.__dict__.update(m=model, fused=None)
        if fused:
            self.__dict__["fused"] = [
                (
                    torch.cat([ly.self_attn.q_proj.weight, ly.self_attn.k_proj.weight, ly.self_attn.v_proj.weight]),
                    torch.cat([ly.self_attn.q_proj.bias, ly.self_attn.k_proj.bias, ly.self_attn.v_proj.bias]),
                    torch.cat([ly.mlp.gate_proj.weight, ly.mlp.up_proj.weight]),
                )
                for ly in model.model.layers
            ]

    def __getattr__(self, k):
        return getattr(self.m, k)

    def __setattr__(self, k, v):
        setattr(self.m, k, v)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kw):
        if not isinstance(attention_mask, dict):
            return self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                **kw,
            )
        return types.SimpleNamespace(
            logits=self.step(input_ids, attention_mask["full_attention"], position_ids, past_key_values)
        )

    def step(self, ids, mask, pos, cache):
        from transformers.models.qwen2.modeling_qwen2 import rotate_half

        from nft.rollout.kv_cache import _decode_sdpa

        m, cfg = self.m.model, self.m.config
        x = F.embedding(ids, m.embed_tokens.weight)
        cos, sin = m.rotary_emb(x, pos)  # once per step, as the model does
        cos, sin = cos[:, None], sin[:, None]
        b, q = ids.shape
        nh, nk = cfg.num_attention_heads, cfg.num_key_value_heads
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm)
            if self.fused:
                wqkv, bqkv, wgu = self.fused[i]
                qkv = F.linear(h, wqkv, bqkv).view(b, q, nh + 2 * nk, a.head_dim).transpose(1, 2)
                qk = qkv[:, : nh + nk]
                qk = (qk * cos) + (rotate_half(qk) * sin)
                qs, ks, vs = qk[:, :nh], qk[:, nh:], qkv[:, nh + nk :]
            else:

                def heads(lin, h=h, a=a):
                    return F.linear(h, lin.weight, lin.bias).view(b, q, -1, a.head_dim).transpose(1, 2)

                qs, ks, vs = heads(a.q_proj), heads(a.k_proj), heads(a.v_proj)
                qs, ks = (qs * cos) + (rotate_half(qs) * sin), (ks * cos) + (rotate_half(ks) * sin)
            ks, vs = cache.layers[i].update(ks, vs)
            o, _ = _decode_sdpa(a, qs, ks, vs, mask, scaling=a.scaling)
            x = x + F.linear(o.reshape(b, q, -1), a.o_proj.weight)
            h = _rms(x, layer.post_attention_layernorm)
            if self.fused:
                gu = F.linear(h, wgu)
                n = gu.shape[-1] // 2
                h = mlp.act_fn(gu[..., :n]) * gu[..., n:]
            else:
                h = mlp.act_fn(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
            x = x + F.linear(h, mlp.down_proj.weight)
        return F.linear(_rms(x, m.norm)[:, -1:], self.m.lm_head.weight)


def run(workload: str, runs: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from nft.data.prompts import render_prompt
    from nft.data.synthetic import SyntheticConfig, build_splits
    from nft.rollout.torch_sampler import TorchSampler

    P, K, new, hidden, layers = rollout_step.WORKLOADS[workload]
    model, tok = rollout_step.build_model(None, hidden, layers)
    problems = build_splits(SyntheticConfig(train_size=2000, eval_size=30))["train"]
    prompts = [render_prompt(tok, p.question) for p in problems[:P]]
    ways = {
        "transformers": TorchSampler(model, tok, cascade=False),
        "minimal": TorchSampler(MinimalDecoder(model, False), tok, cascade=False),
        "fused": TorchSampler(MinimalDecoder(model, True), tok, cascade=False),
        "fused + cascade": TorchSampler(MinimalDecoder(model, True), tok, cascade=True),
    }
    times = {k: [] for k in ways}
    diff = {k: 0.0 for k in ways}
    for s in ways.values():  # warm-up
        s.sample(prompts, K, max_new_tokens=new, seed=0)
    tokens = 0
    for i in range(runs):
        ref = None
        for k, s in ways.items():
            t0 = time.perf_counter()
            ro = s.sample(prompts, K, max_new_tokens=new, seed=i)
            times[k].append(time.perf_counter() - t0)
            if ref is None:
                ref, tokens = ro, tokens + int(ro.mask.sum())
                continue
            if k != "fused + cascade" and not (
                torch.equal(ro.response, ref.response) and torch.equal(ro.logprobs, ref.logprobs)
            ):
                raise SystemExit(f"{k}: tokens or log-probs differ from transformers' forward (seed {i})")
            diff[k] = max(diff[k], float((ro.logprobs - ref.logprobs).abs().max()))
    print(
        f"\n{workload}: Qwen2 {hidden}x{layers}, P x K = {P} x {K}, <= {new} new tokens, {THREADS} threads; "
        f"{runs} runs, {tokens / runs:,.0f} tokens per call; seconds per sampling call, median [min-max]"
    )
    print("| decoding step | s | vs transformers | max log-prob diff |\n|---|---|---|---|")
    base = statistics.median(times["transformers"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.3f} [{min(v):.3f}-{max(v):.3f}] | {base / med:.2f}x | {diff[k]:.1e} |")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ways["transformers"].sample(prompts, K, max_new_tokens=new, seed=0)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    share = {"attention": 0.0, "matrix products": 0.0}
    for e in ev:
        if "attention" in e.key:
            share["attention"] += e.self_cpu_time_total
        elif e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            share["matrix products"] += e.self_cpu_time_total
    share["everything else"] = total - sum(share.values())
    print(
        "profile of one transformers call (self CPU time): "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in share.items())
        + f" of {total / 1e6:.3f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="small")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nft.cli import tune_malloc

    tune_malloc()
    for w in [w for w in args.workloads.split(",") if w]:
        if w not in rollout_step.WORKLOADS:
            ap.error(f"--workloads: unknown {w!r}; expected some of {list(rollout_step.WORKLOADS)}")
        run(w, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
