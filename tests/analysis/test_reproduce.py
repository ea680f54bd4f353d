"""`python -m analysis.reproduce`: a study recorded as a reference, a later study checked against it (hand-made
study folders; a real MLflow sqlite store)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from analysis.reproduce import main

ARMS = {"nft": [40.0, 41.0, 42.0], "rft": [35.0, 36.0, 37.0]}
BENCHES = ["synth-easy", "synth-hard"]


def _study(root, arms=ARMS):
    """A finished study as the pipeline leaves it: run folders with weights, evaluations, the analysis report."""
    (root / "models/base").mkdir(parents=True)
    (root / "models/base/model.safetensors").write_bytes(b"base weights")
    (root / "evals").mkdir()
    (root / "evals/base.json").write_text(json.dumps({b: {"avg@4": 0.2} for b in BENCHES}))
    stats = {"base": {"mean": 20.0, "std": 0.0, "seeds": 1}}
    for arm, means in arms.items():
        for seed, m in enumerate(means):
            name = f"{arm}-s{seed}"
            run = root / "runs" / name
            (run / "model").mkdir(parents=True)
            (run / "model/model.safetensors").write_bytes(f"{name} weights".encode())
            (run / "metrics.json").write_text("{}")
            (run / "config.yaml").write_text(yaml.safe_dump({"resolved": {"algorithm": arm, "seed": seed}}))
            (run / "tags.json").write_text(json.dumps({"arm": arm}))
            (run / "history.jsonl").write_text(
                "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1 + seed)}) + "\n" for s in range(3))
            )
            (root / "evals" / f"{name}.json").write_text(json.dumps({b: {"avg@4": m / 100} for b in BENCHES}))
        stats[arm] = {"mean": sum(means) / 3, "std": 1.0, "seeds": 3, "gain_over_base": sum(means) / 3 - 20}
    claims = {"nft>rft": {"diff": 5.0, "ci_low": 4.0, "ci_high": 6.0, "verdict": "supported"}}
    (root / "params.yaml").write_text("study: {name: repro-test}  # a comment\nseeds: [0, 1, 2]\n")
    (root / "reports").mkdir()
    (root / "reports/metrics.json").write_text(
        json.dumps(
            {
                "metric": "avg@4",
                "metric_per_benchmark": {b: "avg@4" for b in BENCHES},
                "arms": stats,
                "claims": claims,
            }
        )
    )
    return root


def _report(root):
    return json.loads((root / "reports/metrics.json").read_text())


def _run(root, *args):
    return main([*args, "--root", str(root)])


@pytest.fixture
def recorded(tmp_path):
    root = _study(tmp_path / "study")
    ref = tmp_path / "ref.json"
    assert _run(root, "record", "--out", str(ref)) == 0
    return root, ref


def test_record_then_check_the_same_study(recorded, capsys):
    root, ref = recorded
    data = json.loads(ref.read_text())
    assert set(data["runs"]) == {"base"} | {f"{a}-s{s}" for a in ARMS for s in range(3)}
    assert data["runs"]["nft-s2"]["final"] == {"synth-easy": 42.0, "synth-hard": 42.0}
    assert data["claims"]["nft>rft"]["verdict"] == "supported"
    assert data["provenance"]["torch"]
    assert _run(root, "check", "--reference", str(ref), "--exact", "--no-mlflow") == 0
    assert "bit for bit: 7 of 7 runs" in capsys.readouterr().out
    shutil.copytree(root / "runs/nft-s0", root / "runs/nft-s3")  # a run the reference does not have
    shutil.copy(root / "evals/nft-s0.json", root / "evals/nft-s3.json")
    assert _run(root, "check", "--reference", str(ref), "--exact", "--no-mlflow") == 0
    assert "runs not in the reference (not compared): nft-s3" in capsys.readouterr().out


def test_changed_weights_are_reported_and_fail_only_with_exact(recorded, capsys):
    root, ref = recorded
    (root / "runs/rft-s1/model/model.safetensors").write_bytes(b"other bits")
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 0
    assert "bit for bit: 6 of 7 runs" in capsys.readouterr().out
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow", "--exact") == 1
    assert "rft-s1" in capsys.readouterr().err


def test_an_arm_that_moved_beyond_tol_fails_a_verdict_change_is_reported(recorded, capsys):
    root, ref = recorded
    rep = _report(root)
    rep["arms"]["rft"]["mean"] += 0.8
    rep["claims"]["nft>rft"]["verdict"] = "inconclusive"
    (root / "reports/metrics.json").write_text(json.dumps(rep))
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 0
    out = capsys.readouterr().out
    assert "arm rft: mean 36.80 against the reference's 36.00 (+0.80 points)" in out
    assert "claim nft>rft: verdict inconclusive" in out
    rep["arms"]["rft"]["mean"] += 0.4
    (root / "reports/metrics.json").write_text(json.dumps(rep))
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 1
    assert "arm rft: mean 37.20" in capsys.readouterr().err
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow", "--tol", "1.5") == 0


def test_missing_pieces_fail_by_name(recorded, capsys):
    root, ref = recorded
    (root / "evals/nft-s1.json").unlink()
    shutil.rmtree(root / "runs/rft-s2")
    rep = _report(root)
    del rep["arms"]["rft"]
    (root / "reports/metrics.json").write_text(json.dumps(rep))
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 1
    err = capsys.readouterr().err
    assert "run nft-s1: missing evals/nft-s1.json" in err
    assert "run rft-s2: in the reference, not in this study" in err
    assert "arm rft: in the reference, not in this study" in err


def test_record_refuses_an_incomplete_study_and_a_bad_reference_is_named(tmp_path, capsys):
    root = _study(tmp_path / "study")
    (root / "runs/nft-s0/metrics.json").unlink()  # an unfinished run
    out = tmp_path / "ref.json"
    assert _run(root, "record", "--out", str(out)) == 2
    assert "run nft-s0: missing runs/nft-s0/metrics.json" in capsys.readouterr().err
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"runs": {}}))
    assert _run(root, "check", "--reference", str(bad)) == 2
    assert f"{bad}: not a reference" in capsys.readouterr().err


def test_mlflow_must_hold_every_history_value_and_final_number(recorded, tmp_path, capsys):
    """The check reads the study's MLflow experiment: a run not logged, a history value lost or different, and a final
    evaluation number not logged are each named; the complete store passes."""
    from mlflow.tracking import MlflowClient

    root, ref = recorded
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("repro-test")
    for arm, means in ARMS.items():
        for seed, m in enumerate(means):
            name = f"{arm}-s{seed}"
            if name == "rft-s2":
                continue  # never logged
            run = client.create_run(exp, run_name=name, tags={"algorithm": arm, "arm": arm, "seed": str(seed)})
            for s in range(3):
                value = 1.0 / (s + 1 + seed)
                if name == "nft-s1" and s == 2:
                    continue  # a lost history value
                if name == "rft-s0" and s == 1:
                    value += 1e-9  # a different one
                client.log_metric(run.info.run_id, "loss", value, step=s)
            for b in BENCHES:
                if not (name == "nft-s2" and b == "synth-hard"):
                    client.log_metric(run.info.run_id, f"final/{b}/avg_at_4", m / 100, step=0)
            client.set_terminated(run.info.run_id)
    assert _run(root, "check", "--reference", str(ref), "--tracking-uri", uri) == 1
    err = capsys.readouterr().err
    assert "MLflow: run rft-s2 not in experiment 'repro-test'" in err
    assert "MLflow: run nft-s1: 1 history values missing from MLflow (e.g. loss at step 2)" in err
    assert "MLflow: run rft-s0: 1 history values different in MLflow (e.g. loss at step 1)" in err
    assert "MLflow: run nft-s2: 1 final evaluation numbers missing from MLflow (e.g. final/synth-hard/avg@4)" in err
    assert err.count("MLflow:") == 4


def test_a_reference_of_other_parameters_is_refused(recorded, capsys):
    root, ref = recorded
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("# a comment", "# another comment"))  # comments do not count
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 0
    params.write_text(params.read_text().replace("[0, 1, 2]", "[0, 1]"))
    assert _run(root, "check", "--reference", str(ref), "--no-mlflow") == 2
    assert "params.yaml is not the study" in capsys.readouterr().err


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])
def test_the_committed_references_are_of_this_repository_s_params(vendor):
    """experiments/reference/embedded-default.<vendor>.json was recorded on that vendor's processor with today's
    params.yaml (re-record it with `python -m analysis.reproduce record --out
    experiments/reference/embedded-default.<vendor>.json` after `make study` whenever params.yaml changes) and holds
    every run of its matrix."""
    from analysis.reproduce import params_digest

    repo = Path(__file__).parents[2]
    ref = json.loads((repo / f"experiments/reference/embedded-default.{vendor}.json").read_text())
    prov = ref["provenance"]  # (the AMD one was recorded before the vendor field: its processor names it)
    assert prov.get("cpu_vendor", "AuthenticAMD" if "AMD" in prov["processor"] else "") == vendor
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert ref["provenance"]["params_sha256"] == params_digest(repo / "params.yaml"), "stale reference"
    assert ref["provenance"]["study"] == params["study"]["name"]
    runs = {"base"} | {f"{arm}-s{seed}" for arm in params["arms"] for seed in params["seeds"]}
    assert set(ref["runs"]) == runs
    assert set(ref["arms"]) == {"base"} | set(params["arms"])


def test_the_reference_of_this_machine_s_vendor_is_read(tmp_path, monkeypatch, capsys):
    from analysis import reproduce

    monkeypatch.setattr(reproduce, "cpu_vendor", lambda: "GenuineIntel")
    (tmp_path / "s.AuthenticAMD.json").write_text("{}")
    assert reproduce.this_vendors(tmp_path / "s.json") == tmp_path / "s.GenuineIntel.json"
    assert reproduce.this_vendors(tmp_path / "s.AuthenticAMD.json") == tmp_path / "s.AuthenticAMD.json"
    assert reproduce.main(["check", "--reference", str(tmp_path / "s.json"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no study recorded on a GenuineIntel processor (recorded: s.AuthenticAMD.json)" in err


def test_the_params_digest_leaves_out_where_evaluation_runs(tmp_path):
    from analysis.reproduce import params_digest

    p = tmp_path / "params.yaml"
    p.write_text("study: {name: s, launcher: nft}\ntrain: {lr: 0.1}\n")
    before = params_digest(p)
    p.write_text("study: {name: s, launcher: nft, eval_launcher: python -m nft.submit}\ntrain: {lr: 0.1}\n")
    assert params_digest(p) == before
    p.write_text("study: {name: s, launcher: deepspeed}\ntrain: {lr: 0.1}\n")
    assert params_digest(p) != before
