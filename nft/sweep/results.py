"""A finished (or running) sweep's results: its trials as a table, and its best setting as a params file."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import apply_overrides, load_study, load_yaml
from .space import override_sets


def sweep_table(study_name: str, storage: str) -> str:
    """The study's trials as a Markdown table, best first: parameters, each arm's value (mean over seeds), the
    objective and the state (the tables of docs/log.md)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    params = sorted({k for t in trials for k in t.params})
    seen = list(dict.fromkeys(k.split("/")[1] for t in trials for k in t.user_attrs if k.startswith("value/")))
    arms = [a for a in study.user_attrs.get("arms", []) if a in seen] + sorted(
        set(seen) - set(study.user_attrs.get("arms", []))
    )
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    trials.sort(key=lambda t: (t.value is None, sign * (t.value or 0.0), t.number))
    lines = [
        "| trial | " + " | ".join(params + arms) + " | objective | state |",
        "|---" * (len(params) + len(arms) + 3) + "|",
    ]
    for t in trials:
        cells = [
            f"{t.params[p]:.3g}" if isinstance(t.params.get(p), float) else str(t.params.get(p, "–")) for p in params
        ]
        for a in arms:
            vals = [v for k, v in t.user_attrs.items() if k.startswith(f"value/{a}/")]
            cells.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "–")
        obj = f"{100 * t.value:.1f}" if t.value is not None else "–"
        lines.append(f"| {t.number} | " + " | ".join(cells) + f" | {obj} | {t.state.name.lower()} |")
    return "\n".join(lines) + "\n"


def write_best(study_name: str, storage: str, config: str, out: str) -> dict:
    """Write ``config`` with the best trial's parameters applied: a params file for ``dvc exp run`` or ``nft``."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    try:
        best = study.best_trial
    except ValueError:
        raise ValueError(f"study {study_name!r}: no completed trial yet") from None
    load_study(config, override_sets(best.params))  # the result must be a valid params file
    raw = apply_overrides(load_yaml(config), override_sets(best.params))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    header = f"# best trial {best.number} of sweep {study_name!r}: value {best.value:.6g}\n"
    Path(out).write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return {"trial": best.number, "value": best.value, "params": best.params}
