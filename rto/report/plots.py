"""Matplotlib figures for the run report (Agg backend, PNG files)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVE_METRICS = [
    ("gold", "gold score"),
    ("rm", "reward-model score"),
    ("kl", "KL to reference"),
    ("eos_rate", "EOS rate"),
]
TIME_PARTS = [("time_generate_s", "generate"), ("time_score_s", "score"), ("time_update_s", "update")]


def format_duration(seconds: float | None) -> str:
    """1034.2 -> '17 min 14 s'; 12.34 -> '12.3 s'; 3723 -> '1 h 02 min 03 s'."""
    if seconds is None:
        return "–"
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return str(seconds)
    if not math.isfinite(s):
        return str(s)
    if s < 60:
        return f"{s:.1f} s"
    total = int(round(s))
    h, rem = divmod(total, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min {sec:02d} s"
    return f"{m} min {sec} s"


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def method_colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    out: dict[str, Any] = {}
    for name in names:
        if name not in out:
            out[name] = cmap(len(out) % 10)
    return out


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[dict]], path: Path, colors: dict | None = None) -> Path | None:
    """Subplots of gold / RM / KL / EOS rate against PPO iteration, one line per method."""
    methods = [(m, rows) for m, rows in (curves or {}).items() if rows]
    metrics = [
        (k, label)
        for k, label in CURVE_METRICS
        if any(r.get(k) is not None for _, rows in methods for r in rows)
    ]
    if not metrics:
        return None
    colors = colors or method_colors([m for m, _ in methods])
    n = len(metrics)
    nrows, ncols = (2, 2) if n == 4 else (1, n)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax, (key, label) in zip(flat, metrics):
        for method, rows in methods:
            xs = [_f(r.get("iteration", i + 1)) for i, r in enumerate(rows)]
            ys = [_f(r.get(key)) for r in rows]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(xs, ys, label=method, color=colors.get(method),
                    marker="o" if len(rows) <= 30 else None, markersize=3, linewidth=1.6)
        ax.set_title(label, fontsize=11)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    for ax in flat[n:]:
        ax.set_visible(False)
    handles, labels = flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1.04), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _time_split(curves: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Mean seconds per iteration of generate/score/update, per method."""
    out = {}
    for method, rows in (curves or {}).items():
        means = []
        for key, _ in TIME_PARTS:
            vals = [_f(r.get(key)) for r in rows or [] if r.get(key) is not None]
            vals = [v for v in vals if not math.isnan(v)]
            means.append(sum(vals) / len(vals) if vals else 0.0)
        if any(means):
            out[method] = means
    return out


def plot_times(phase_times: dict[str, float] | None, curves: dict | None, path: Path) -> Path | None:
    """Bar chart of wall time per pipeline phase, plus per-iteration generate/score/update split."""
    phases = [(k, _f(v)) for k, v in (phase_times or {}).items() if not math.isnan(_f(v))]
    split = _time_split(curves or {})
    panels = (1 if phases else 0) + (1 if split else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 0.45 * max(len(phases), len(split), 3) + 1.6),
                             squeeze=False)
    axes = list(axes.ravel())
    if phases:
        ax = axes.pop(0)
        names = [k for k, _ in phases][::-1]
        vals = [v for _, v in phases][::-1]
        bars = ax.barh(names, vals, color="#4c72b0")
        total = sum(vals)
        for b, v in zip(bars, vals):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + format_duration(v),
                    va="center", fontsize=9)
        ax.set_xlim(0, max(vals) * 1.3 if max(vals) > 0 else 1)
        ax.set_xlabel("seconds")
        ax.set_title(f"wall time per phase (total {format_duration(total)})", fontsize=11)
        ax.grid(axis="x", alpha=0.3)
    if split:
        ax = axes.pop(0)
        names = list(split)[::-1]
        left = [0.0] * len(names)
        part_colors = ["#55a868", "#c44e52", "#8172b2"]
        for j, (_, label) in enumerate(TIME_PARTS):
            widths = [split[m][j] for m in names]
            ax.barh(names, widths, left=left, label=label, color=part_colors[j])
            left = [a + b for a, b in zip(left, widths)]
        for i, tot in enumerate(left):
            ax.text(tot, i, f" {tot:.1f} s", va="center", fontsize=9)
        ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
        ax.set_xlabel("mean seconds per PPO iteration")
        ax.set_title("time split per iteration", fontsize=11)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
