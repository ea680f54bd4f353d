"""`dvc repro` on a copy of the repository with a smoke params file: every stage's outs, then a training param
change reruns only train/evaluate/analyze."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY, copy_checkout

SMOKE = {
    "study": {"name": "smoke", "launcher": "nft", "eval_launcher": "nft"},
    "arms": ["nft", "grpo"],
    "seeds": [0],
    "arm_settings": {"nft": {"algorithm": "nft"}, "grpo": {"algorithm": "grpo"}},
    **{k: v for k, v in TINY.items() if k != "train"},
    "train": {**TINY["train"], "model": "models/base", "data": "data", "tracking": False},
    "eval": {"benchmarks": ["synth-easy", "synth-medium"], "k": 2, "limit": 6, "max_new_tokens": 24, "workers": 1},
}


def _dvc(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def repo_copy(tmp_path):
    dst = copy_checkout(tmp_path / "repo")
    (dst / "params.yaml").write_text(yaml.safe_dump(SMOKE, sort_keys=False))
    return dst


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_smoke_and_selective_rerun(repo_copy):
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == {
        "prepare",
        "base",
        "evaluate-base",
        "train@nft-0",
        "train@grpo-0",
        "evaluate@nft-0",
        "evaluate@grpo-0",
        "analyze",
    }
    assert json.loads((repo_copy / "metrics.json").read_text())["avg@2"]["base"]["seeds"] == 1  # the base row
    for run in ("nft-s0", "grpo-s0"):
        assert (repo_copy / "runs" / run / "metrics.json").is_file()
        assert (repo_copy / "runs" / run / "model" / "model.safetensors").is_file()
        ev = json.loads((repo_copy / "evals" / f"{run}.json").read_text())
        assert set(ev) == {"synth-easy", "synth-medium", "mean"}
    assert (repo_copy / "reports" / "summary.md").is_file()
    assert (repo_copy / "reports" / "figures" / "val_accuracy.png").is_file()
    assert (repo_copy / "data" / "train.jsonl").is_file() and (repo_copy / "models" / "base" / "config.json").is_file()

    shown = _dvc(repo_copy, "metrics", "show").stdout
    assert "evals/nft-s0.json" in shown and "avg@2" in shown

    _dvc(repo_copy, "plots", "show", "--out", "plots_html")
    assert (repo_copy / "plots_html" / "index.html").is_file()

    # a one-line change to the trainer's log-prob pass: every stage that imports it is out of date, train included
    modeling = repo_copy / "nft" / "modeling.py"
    original = modeling.read_text()
    modeling.write_text(original + "\n# changed\n")
    assert {"train@nft-0", "train@grpo-0", "evaluate@nft-0", "evaluate@grpo-0"} <= _changed(repo_copy)
    modeling.write_text(original)
    assert _changed(repo_copy) == set()
    # a change to one arm's loss: that arm's runs only
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["arm_settings"]["nft"]["loss"] = {"eps": 0.5}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _changed(repo_copy) == {"train@nft-0"}
    params["arm_settings"]["nft"].pop("loss")
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # a training param changes: train, evaluate and analyze rerun; prepare and base do not
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["lr"] = 2e-3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == {"train@nft-0", "train@grpo-0", "evaluate@nft-0", "evaluate@grpo-0", "analyze"}
    # nothing changed: nothing runs
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == set()


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.split("/")[0] in ("nft", "analysis")}


@pytest.mark.parametrize("name", ["prepare", "base", "evaluate-base", "train", "evaluate", "analyze"])
def test_stage_deps_are_the_code_its_command_imports(name):
    """dvc.yaml lists exactly the project files a stage's command imports (nft.deps: the transitive import closure):
    a file it misses would leave stale results 'up to date'; a folder lists only when all of it is needed."""
    from nft.deps import stage_code

    needed = set(stage_code(name))
    listed = _code_deps(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name])
    covered, extra = set(), []
    for dep in listed:
        path = REPO / dep
        files = {str(f.relative_to(REPO)) for f in path.rglob("*.py")} if path.is_dir() else {dep}
        if not files <= needed:
            extra.append(f"{dep} ({sorted(files - needed)[:3]} not imported)")
        covered |= files
    assert not sorted(needed - covered), f"dvc.yaml: stage {name} misses {sorted(needed - covered)}"
    assert not extra, f"dvc.yaml: stage {name} lists code it does not run: {extra}"


def _changed(cwd: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    out = _dvc(cwd, "status").stdout
    return {ln.rstrip(":") for ln in out.splitlines() if ln and not ln[0].isspace() and ln.endswith(":")}


def test_bad_params_stop_before_any_stage(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["promts_per_step"] = 3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        [sys.executable, "-m", "nft.cli", "check", "--config", "params.yaml"],
        cwd=repo_copy,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "train.promts_per_step" in r.stderr


class _Recording(dict):
    """A mapping that notes every key read from it (item access, ``get``, ``in``)."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)


def _keys_read(monkeypatch, stage: dict, params: Path, arm: str) -> set[str]:
    """The top-level params.yaml keys that ``stage``'s command reads, recorded while running that very command line
    (from dvc.yaml) on ``params`` with its work stubbed out (``run_training``, ``run_evaluate``).

    A key counts as read when the command looks up a section of :func:`nft.config.load_study`'s result, a key of
    its raw mapping, or a field of its ``plan`` (:class:`nft.config.StudyConfig`, whose fields are top-level keys).
    Copying everything into the run folder's ``config.yaml`` (``to_dict``: a record, not an input of the run) does
    not count, nor does load_study's validation of the whole file."""
    import shlex

    import nft.config
    import nft.evaluate
    import nft.train.run
    from nft.cli import main

    seen: set = set()
    on = [True]
    real_load, real_to_dict = nft.config.load_study, nft.config.to_dict

    def load_study(*args, **kwargs):
        cfg = real_load(*args, **kwargs)
        plan = cfg["plan"]

        class Plan(type(plan)):
            def __getattribute__(self, name):
                if on[0] and name in nft.config.STUDY_KEYS:
                    seen.add(name)
                return super().__getattribute__(name)

        object.__setattr__(plan, "__class__", Plan)
        return _Recording({**cfg, "_raw": _Recording(cfg["_raw"], seen)}, seen)

    def to_dict(obj):
        on[0] = False
        try:
            return real_to_dict(obj)
        finally:
            on[0] = True

    monkeypatch.setattr(nft.config, "load_study", load_study)
    monkeypatch.setattr(nft.config, "to_dict", to_dict)
    monkeypatch.setattr(nft.train.run, "run_training", lambda *a, **k: {})
    monkeypatch.setattr(nft.evaluate, "run_evaluate", lambda *a, **k: {})
    cmd = stage["cmd"]
    for var, value in {
        "${study.launcher}": "nft",
        "${study.eval_launcher}": "nft",
        "${item.arm}": arm,
        "${item.seed}": "0",
    }.items():
        cmd = cmd.replace(var, value)
    argv = shlex.split(cmd)
    assert argv[0] == "nft" and "${" not in cmd, cmd
    monkeypatch.chdir(params.parent)
    assert main(argv[1:]) == 0
    read = seen - {"_raw", "plan"}
    assert read, f"{cmd}: read nothing from load_study's result (the recording missed the command's reads)"
    return read


def _listed_params(stage: dict) -> set[str]:
    """Top-level params.yaml keys a dvc.yaml stage lists (``train``, ``train.lr``, ``{params.yaml: [...]}``)."""
    keys = set()
    for entry in stage.get("params", []):
        names = [entry] if isinstance(entry, str) else [k for f, ks in entry.items() if f == "params.yaml" for k in ks]
        keys |= {n.split(".")[0] for n in names}
    return keys


@pytest.mark.parametrize("preset", ["params.yaml", "experiments/ablation-omega.yaml"])
@pytest.mark.parametrize("stage_name", ["train", "evaluate"])
def test_stage_params_list_what_its_command_reads(monkeypatch, tmp_path, stage_name, preset):
    """dvc repro reruns a stage only when a listed param changes: a key the command reads but the stage does not
    list (``arm_settings`` for train, once) leaves stale runs in place. The ablation preset runs its first arm, a
    name in its ``arm_settings``, so the command's branch for a named arm is exercised too."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage_name]
    study = yaml.safe_load((REPO / preset).read_text())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(study, sort_keys=False))
    read = _keys_read(monkeypatch, stage, params, study["arms"][0])
    missing = sorted(read - _listed_params(stage))
    assert not missing, f"dvc.yaml: stage {stage_name}: params does not list {missing}, which `nft {stage_name}` reads"


def test_study_files_carry_the_train_params():
    """dvc repro refuses a stage whose listed param is absent from params.yaml, so params.yaml and every preset as
    `nft compose` writes it over params.yaml carry each key the train stage lists, if only as an empty mapping."""
    from nft.config import compose_study

    listed = _listed_params(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"])
    for path in [REPO / "params.yaml", *sorted((REPO / "experiments").glob("*.yaml"))]:
        study = yaml.safe_load(path.read_text())
        if "arms" not in study:
            continue  # not a study file (a sweep space)
        if path.parent.name == "experiments":
            study = compose_study(path)
        missing = sorted(listed - set(study))
        assert not missing, f"{path.relative_to(REPO)}: no {missing}, which dvc.yaml's train stage lists as params"
    assert not sorted(listed - set(SMOKE)), "SMOKE (this file's study) lacks a key dvc.yaml's train stage lists"


def _git(cwd: Path, *args) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.mark.slow
def test_queued_experiments_keep_metrics_and_mlflow_runs(repo_copy):
    """`dvc exp run --queue` + `dvc queue start`: each experiment shows its final metrics and the study summary in
    `dvc exp show`, and its runs land in the repository's MLflow store (not in the deleted temporary workspace)."""
    from mlflow.tracking import MlflowClient

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["tracking"] = True
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(repo_copy, "repro")  # the baseline; the queued experiments take data and the base model from the cache
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-qm", "baseline")
    for name, lr in (("q1", 1e-3), ("q2", 2e-3)):
        _dvc(repo_copy, "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}")
    _dvc(repo_copy, "queue", "start", "-j", "1")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = _dvc(repo_copy, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status
    shown = json.loads(_dvc(repo_copy, "exp", "show", "--json").stdout)
    exps = {rev["name"]: rev for base in shown for exp in (base.get("experiments") or []) for rev in exp["revs"]}
    for name in ("q1", "q2"):
        data = exps[name]["data"]
        metrics = data["metrics"]
        assert metrics["evals/nft-s0.json"]["data"]["synth-easy"]["avg@2"] >= 0
        assert set(metrics["metrics.json"]["data"]["avg@2"]) == {"base", "nft", "grpo"}  # the base model is a row
    diff = _dvc(repo_copy, "exp", "diff", "q1", "q2").stdout
    assert "train.lr" in diff
    client = MlflowClient(tracking_uri=f"sqlite:///{repo_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    by_exp = {}
    for r in runs:
        if "algorithm" in r.data.tags:
            by_exp.setdefault(r.data.tags["dvc.exp_name"], set()).add(r.info.run_name)
    assert by_exp["q1"] == by_exp["q2"] == {"nft-s0", "grpo-s0"}, by_exp
