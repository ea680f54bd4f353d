"""Figures at paper size (matplotlib, PNG + PDF): mean line and ± std band over seeds, one colour per algorithm."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .load import curve  # noqa: E402

#: one colour per algorithm in every figure (ablation arms share their algorithm's colour, other line styles)
COLORS = {
    "nft": "#d62728",
    "dapo": "#1f77b4",
    "grpo": "#2ca02c",
    "dr_grpo": "#9467bd",
    "rft": "#7f7f7f",
    "sft": "#8c564b",
    "base": "#000000",
}
LABELS = {
    "nft": "NFT",
    "dapo": "DAPO",
    "grpo": "GRPO",
    "dr_grpo": "Dr.GRPO",
    "rft": "RFT",
    "sft": "SFT",
    "dpo": "DPO",
    "base": "Base model",
}
STYLES = ["-", "--", ":", "-."]


def _algorithm_of(arm: str) -> str:
    for algo in sorted(COLORS, key=len, reverse=True):
        if arm == algo or arm.startswith(algo + "-") or arm.startswith(algo + "["):
            return algo
    return arm


def _style(arm: str, seen: dict) -> dict:
    algo = _algorithm_of(arm)
    k = seen.setdefault(algo, [])
    if arm not in k:
        k.append(arm)
    label = LABELS.get(algo, algo) + (arm[len(algo) :] if arm != algo else "")
    return {"color": COLORS.get(algo, "#333333"), "linestyle": STYLES[k.index(arm) % len(STYLES)], "label": label}


def optimizer_steps(history: pd.DataFrame, arms: list[str]) -> dict[str, int]:
    """Optimizer steps per rollout step of each arm (the median of ``train/optimizer_steps`` over its runs)."""
    sub = history[(history.metric == "train/optimizer_steps") & history.arm.isin(arms)]
    return {v: int(round(g.value.median())) for v, g in sub.groupby("arm")}


def x_label(history: pd.DataFrame, arms: list[str]) -> str:
    """``rollout step (4 optimizer steps each)``, or the per-arm counts when they differ."""
    n = optimizer_steps(history, arms)
    if not n:
        return "rollout step"
    if len(set(n.values())) == 1:
        k = next(iter(n.values()))
        return f"rollout step ({k} optimizer step{'s' if k != 1 else ''} each)"
    return "rollout step (optimizer steps each: " + ", ".join(f"{v} {k}" for v, k in sorted(n.items())) + ")"


def curve_figure(
    history: pd.DataFrame,
    metric: str,
    ylabel: str,
    title: str,
    arms: list[str] | None = None,
    scale: float = 1.0,
    per_seed: bool = False,
):
    """One panel: ``metric`` vs rollout step, mean line and ± std band over seeds per arm (``per_seed``: each
    seed's curve as a thin line as well). The legend sits right of the axes, off the data. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(5.0, 2.8), dpi=150, layout="constrained")
    c = curve(history, metric)
    seen: dict = {}
    shown = [v for v in (arms or sorted(c.arm.unique())) if not c[c.arm == v].empty]
    for arm in shown:
        d = c[c.arm == arm].sort_values("step")
        st = _style(arm, seen)
        ax.plot(d.step, d["mean"] * scale, lw=1.4, **st)
        ax.fill_between(
            d.step, (d["mean"] - d["std"]) * scale, (d["mean"] + d["std"]) * scale, color=st["color"], alpha=0.18, lw=0
        )
        if per_seed:
            runs = history[(history.arm == arm) & (history.metric == metric)].dropna(subset=["value"])
            for _, g in runs.groupby("seed"):
                g = g.sort_values("step")
                ax.plot(g.step, g.value * scale, lw=0.5, alpha=0.5, color=st["color"], linestyle=st["linestyle"])
    ax.set_xlabel(x_label(history, shown), fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=7, frameon=False, loc="outside right center")
    return fig


def save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def standard_figures(history: pd.DataFrame, k: int, per_seed: bool = False) -> dict[str, object]:
    """The paper's figures that the data supports: name -> Figure (``per_seed``: thin per-seed lines too)."""
    figs = {}
    metrics = set(history.metric.unique())
    pairs = history[["algorithm", "arm"]].drop_duplicates()
    # the arms named after an algorithm (the paper presets' rft is NFT with neg_weight 0: still RFT)
    main = pairs[(pairs.algorithm == pairs.arm) | pairs.arm.isin(list(LABELS))]
    default_arms = sorted(set(main.arm)) or sorted(pairs.arm)

    def fig(*args):
        return curve_figure(*args, per_seed=per_seed)

    key = f"val/mean/avg@{k}"
    if key in metrics:
        figs["val_accuracy"] = fig(
            history, key, f"validation avg@{k} (%)", "Validation accuracy (mean over benchmarks)", default_arms, 100
        )
    for m in sorted(metrics):
        parts = m.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[1] != "mean" and parts[2] == f"avg@{k}":
            figs[f"val_accuracy_{parts[1]}"] = fig(history, m, f"avg@{k} (%)", parts[1], default_arms, 100)
    for name, m, label, title in [
        ("entropy", "policy/entropy", "entropy (nats/token)", "Policy entropy (all sampled answers)"),
        ("reward", "rollout/accuracy", "training accuracy (%)", "Training reward"),
        ("length", "response/length_mean", "tokens", "Response length"),
    ]:
        if m in metrics:
            figs[name] = fig(history, m, label, title, default_arms, 100 if name == "reward" else 1)
    for algo, group in pairs.groupby("algorithm"):
        arms = sorted(group.arm)
        if len(arms) < 2:
            continue
        if key in metrics:
            figs[f"ablation_{algo}"] = fig(
                history, key, f"validation avg@{k} (%)", f"{LABELS.get(algo, algo)} arms", arms, 100
            )
    return figs
