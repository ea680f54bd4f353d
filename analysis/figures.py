"""Figures at paper size (matplotlib, PNG + PDF): mean line and ± std band over seeds, one colour per algorithm."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .load import curve  # noqa: E402

#: one colour per algorithm in every figure (ablation variants share their algorithm's colour, other line styles)
COLORS = {"nft": "#d62728", "dapo": "#1f77b4", "grpo": "#2ca02c", "dr_grpo": "#9467bd", "rft": "#7f7f7f"}
LABELS = {"nft": "NFT", "dapo": "DAPO", "grpo": "GRPO", "dr_grpo": "Dr.GRPO", "rft": "RFT"}
STYLES = ["-", "--", ":", "-."]


def _algo_of(variant: str) -> str:
    for algo in sorted(COLORS, key=len, reverse=True):
        if variant == algo or variant.startswith(algo + "-") or variant.startswith(algo + "["):
            return algo
    return variant


def _style(variant: str, seen: dict) -> dict:
    algo = _algo_of(variant)
    k = seen.setdefault(algo, [])
    if variant not in k:
        k.append(variant)
    label = LABELS.get(algo, algo) + (variant[len(algo):] if variant != algo else "")
    return {"color": COLORS.get(algo, "#333333"), "linestyle": STYLES[k.index(variant) % len(STYLES)], "label": label}


def curve_figure(history: pd.DataFrame, metric: str, ylabel: str, title: str, variants: list[str] | None = None,
                 scale: float = 1.0):
    """One panel: ``metric`` vs training step (rollout step), mean ± std band per variant. Returns the Figure."""
    fig, ax = plt.subplots(figsize=(3.4, 2.6), dpi=150)
    c = curve(history, metric)
    seen: dict = {}
    for variant in variants or sorted(c.variant.unique()):
        d = c[c.variant == variant].sort_values("step")
        if d.empty:
            continue
        st = _style(variant, seen)
        ax.plot(d.step, d["mean"] * scale, lw=1.4, **st)
        ax.fill_between(d.step, (d["mean"] - d["std"]) * scale, (d["mean"] + d["std"]) * scale,
                        color=st["color"], alpha=0.18, lw=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    return fig


def save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def standard_figures(history: pd.DataFrame, k: int) -> dict[str, object]:
    """The paper's figures that the data supports: name -> Figure."""
    figs = {}
    metrics = set(history.metric.unique())
    pairs = history[["algo", "variant"]].drop_duplicates()
    default_variants = sorted(pairs[pairs.algo == pairs.variant].variant) or sorted(pairs.variant)
    key = f"val/mean/avg@{k}"
    if key in metrics:
        figs["val_accuracy"] = curve_figure(history, key, f"validation avg@{k} (%)",
                                            "Validation accuracy (mean over benchmarks)", default_variants, 100)
    for m in sorted(metrics):
        parts = m.split("/")
        if len(parts) == 3 and parts[0] == "val" and parts[1] != "mean" and parts[2] == f"avg@{k}":
            figs[f"val_accuracy_{parts[1]}"] = curve_figure(history, m, f"avg@{k} (%)", parts[1], default_variants,
                                                            100)
    for name, m, label, title in [("entropy", "policy/entropy", "entropy (nats/token)", "Policy entropy (all sampled answers)"),
                                  ("reward", "rollout/accuracy", "training accuracy (%)", "Training reward"),
                                  ("length", "response/length_mean", "tokens", "Response length")]:
        if m in metrics:
            figs[name] = curve_figure(history, m, label, title, default_variants, 100 if name == "reward" else 1)
    for algo, group in pairs.groupby("algo"):
        variants = sorted(group.variant)
        if len(variants) < 2:
            continue
        if key in metrics:
            figs[f"ablation_{algo}"] = curve_figure(history, key, f"validation avg@{k} (%)",
                                                    f"{LABELS.get(algo, algo)} ablation", variants, 100)
    return figs
