"""A short pretrain through the real CLI produces a loadable, deterministic folder."""

import json
import subprocess
import sys

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

SMALL = {
    "data": {"train_size": 600, "eval_size": 30},
    "model": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 64,
        "vocab_size": 320,
    },
    "pretrain": {"steps": 6, "batch_size": 4, "warmup": 2, "tokenizer_corpus": 300},
}


def _run(params, out):
    return subprocess.run(
        [sys.executable, "-m", "nft.cli", "pretrain", "--config", str(params), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )


def test_short_pretrain_is_loadable_and_bit_identical(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(SMALL))
    r1 = _run(params, tmp_path / "a")
    assert r1.returncode == 0, r1.stderr
    r2 = _run(params, tmp_path / "b")
    assert r2.returncode == 0, r2.stderr
    s1 = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    s2 = json.loads((tmp_path / "b" / "pretrain.json").read_text())
    assert s1["weights_sha256"] == s2["weights_sha256"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert not list(tmp_path.glob(".a.tmp*"))


def test_bad_params_fail_before_work(tmp_path):
    bad = dict(SMALL, data={"families": ["add", "calculus"]})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(bad))
    r = _run(params, tmp_path / "m")
    assert r.returncode == 2 and "calculus" in r.stderr and "data.families" in r.stderr
    assert not (tmp_path / "m").exists()
    params.write_text(yaml.safe_dump(dict(SMALL, pretrain={"stepz": 3})))
    r = _run(params, tmp_path / "m")
    assert r.returncode == 2 and "pretrain.stepz" in r.stderr
