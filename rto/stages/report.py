"""`rto report`: turn an eval folder and PPO/RTO run folders into report.md and report.html."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rto.distributed import is_main
from rto.report import pairwise_verdict, write_report
from rto.runtime import claim_run_folder, machine, read_metrics, versions


@dataclass
class ReportConfig:
    """Fields of `rto report`: report.md and report.html from an eval folder and PPO run folders."""

    out: str = "runs/demo"
    """Folder of report.md, report.html and plots/: a new or empty folder, or one rto made."""
    eval: str = "runs/demo/eval"
    """Folder written by `rto eval` (its eval.json)."""
    curves: dict[str, str] = field(default_factory=dict)
    """Training curves to plot: label -> `rto ppo` run folder, e.g. {rto: runs/rto, ppo: runs/ppo}."""
    pipeline: str | None = None
    """pipeline.json of `rto pipeline`, for the time per phase and the recipe; null = none."""
    title: str = "rto report"
    """Title of the report."""


def _summary_lines(table: list[dict], baseline: str, pairwise: list[dict]) -> list[str]:
    """The headline paired comparison first (eval's `headline`, RTO vs PPO by default), then each model vs the baseline."""
    lines = []
    if pairwise:
        p = pairwise[0]
        lines.append(f"{p['a']} vs {p['b']}: paired Δ gold {p['gold_delta']:+.3f} ± {p['gold_delta_ci95']:.3f}, "
                     f"win rate {p['win_rate']:.2f} ± {p['win_rate_ci95']:.2f} ({pairwise_verdict(p)})")
    for row in table:
        if row.get("gold_delta") is None:
            continue
        d, ci = row["gold_delta"], row["gold_delta_ci95"]
        verdict = "above" if d - ci > 0 else "below" if d + ci < 0 else "not distinguishable from"
        lines.append(f"{row['model']}: gold {row['gold_mean']:.3f} vs {baseline} {_gold(table, baseline):.3f} "
                     f"(paired Δ {d:+.3f} ± {ci:.3f}, {verdict} {baseline}); KL {row['kl']:.2f}, "
                     f"EOS rate {row['eos_rate']:.2f}")
    return lines


def _gold(table, label):
    return next(r["gold_mean"] for r in table if r["model"] == label)


def run(cfg: ReportConfig) -> tuple[Path, Path] | None:
    """Write report.md and report.html into `cfg.out`; with several processes process 0 alone does (the others
    return None at once)."""
    if not is_main():
        return None
    eval_path = Path(cfg.eval) / "eval.json"
    if not eval_path.exists():
        raise FileNotFoundError(f"{eval_path} not found: run `rto eval --out {cfg.eval}` first")
    ev = json.loads(eval_path.read_text())
    pipeline = json.loads(Path(cfg.pipeline).read_text()) if cfg.pipeline and Path(cfg.pipeline).exists() else {}
    phase_times = pipeline.get("phase_times", {})
    setup = {
        "task": ev.get("task"), "eval prompts": ev.get("n_prompts"), "eval seed": ev.get("seed"),
        "sampling": f"temperature {ev.get('temperature')}, at most {ev.get('max_new_tokens')} new tokens",
        "machine": machine(), "versions": versions(),
    }
    if phase_times:
        setup["wall_time_s"] = sum(phase_times.values())
    if pipeline.get("recipe"):
        setup["recipe"] = pipeline["recipe"]
    results = {
        "title": cfg.title,
        "summary": _summary_lines(ev["table"], ev["baseline"], ev.get("pairwise", [])),
        "setup": setup,
        "table": ev["table"],
        "baseline": ev["baseline"],
        "pairwise": ev.get("pairwise", []),
        "curves": {label: read_metrics(folder) for label, folder in cfg.curves.items()},
        "phase_times": phase_times,
        "heatmaps": ev.get("heatmaps", []),
        "samples": ev.get("samples", []),
        "by_kind": ev.get("by_kind", {}),
        "methods": ev.get("methods", {}),
        "notes": [
            "One training seed: the intervals cover the evaluation sample, not run-to-run variation.",
            "Gold gains that come with longer responses and a lower EOS rate partly reward length; "
            "read the length and EOS columns beside the gold score.",
        ],
    }
    with claim_run_folder(cfg.out):  # rto's own folder (a pipeline's), never a user's; no link followed
        md, html_path = write_report(results, cfg.out)
    print(f"report: {md} and {html_path}")
    return md, html_path
