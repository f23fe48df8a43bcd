"""Run report: markdown + a single self-contained HTML file + PNG plots.

``write_report(results, out_dir)`` renders the ``results`` dict produced by a run of the
RTO pipeline (see the section helpers below for the keys used; every key except
``table`` is optional and its section is omitted when absent).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Callable

from rto.report.plots import format_duration, method_colors, plot_curves, plot_times

__all__ = ["write_report", "format_table_markdown", "format_pairwise_markdown", "pairwise_verdict",
           "format_duration", "token_color"]

_POS = (26, 152, 80)  # green end of the diverging scale
_NEG = (215, 48, 39)  # red end


# ---------------------------------------------------------------- table
def _num(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return str(v)
    return f"{float(v):.{nd}f}"


def _pm(row: dict, key: str, ci_key: str) -> str:
    if row.get(key) is None:
        return "–"
    s = _num(row[key])
    return s + f" ± {_num(row[ci_key])}" if row.get(ci_key) is not None else s


def _columns(baseline: str | None) -> list[tuple[str, str, str | None, Callable[[dict], str]]]:
    """(header, legend, key whose presence enables the column, cell function)."""
    base = baseline or "the baseline"
    return [
        ("model", "", None, lambda r: str(r.get("model", "?"))),
        ("gold ± 95% CI", "mean gold (ground-truth) score of the responses, ± 95% CI half-width",
         "gold_mean", lambda r: _pm(r, "gold_mean", "gold_ci95")),
        (f"gold Δ vs {baseline or 'baseline'} ± CI",
         f"mean paired difference of gold scores with {base} on the same prompts, ± 95% CI half-width",
         "gold_delta", lambda r: _pm(r, "gold_delta", "gold_delta_ci95")),
        (f"win rate vs {baseline or 'baseline'} ± CI",
         f"share of prompts where the response's gold score beats {base}'s (ties count half), ± 95% CI",
         "win_rate", lambda r: _pm(r, "win_rate", "win_rate_ci95")),
        ("KL to ref ± CI", "KL(policy || reference) in nats per response: mean over the evaluated responses of "
         "the summed log-ratio log pi - log pi_ref, ± 95% CI", "kl", lambda r: _pm(r, "kl", "kl_ci95")),
        ("KL per token", "the same per response token (each response's KL divided by its length, averaged), so "
         "long responses do not hide a large KL per token", "kl_per_token", lambda r: _num(r.get("kl_per_token"))),
        ("RM score", "mean score of the learned reward model", "rm_mean", lambda r: _num(r.get("rm_mean"))),
        ("length", "mean response length in tokens", "length", lambda r: _num(r.get("length"), 1)),
        ("EOS rate", "share of responses that ended with EOS (not cut at the token limit)",
         "eos_rate", lambda r: _num(r.get("eos_rate"))),
        ("n", "number of evaluated prompts", "n", lambda r: "–" if r.get("n") is None else str(r["n"])),
    ]


def _table_cells(table: list[dict], baseline: str | None):
    cols = [c for c in _columns(baseline) if c[2] is None or any(r.get(c[2]) is not None for r in table)]
    headers = [c[0] for c in cols]
    rows = [[c[3](r) for c in cols] for r in table]
    legend = [(c[0], c[1]) for c in cols if c[1]]
    return headers, rows, legend


def format_table_markdown(table: list[dict], baseline: str | None, legend: bool = True) -> str:
    """Markdown comparison table (one row per model), optionally followed by a column legend."""
    table = table or []
    headers, rows, leg = _table_cells(table, baseline)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    if legend and leg:
        lines.append("")
        lines += [f"- **{h}**: {text}" for h, text in leg]
    return "\n".join(lines) + "\n"


def _pairwise_cells(pairwise: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["comparison", "gold Δ ± 95% CI", "win rate ± CI", "verdict", "n"]
    rows = [[f"{p['a']} − {p['b']}", _pm(p, "gold_delta", "gold_delta_ci95"), _pm(p, "win_rate", "win_rate_ci95"),
             pairwise_verdict(p), str(p.get("n", "–"))] for p in pairwise]
    return headers, rows


def pairwise_verdict(p: dict) -> str:
    """'a above b' / 'a below b' when the 95% interval of the paired difference excludes 0, else 'no difference'."""
    d, ci = p.get("gold_delta"), p.get("gold_delta_ci95")
    if d is None or ci is None or not math.isfinite(ci):
        return "–"
    return f"{p['a']} above {p['b']}" if d - ci > 0 else f"{p['a']} below {p['b']}" if d + ci < 0 else "no difference"


def format_pairwise_markdown(pairwise: list[dict]) -> str:
    """Markdown table of every paired comparison (gold difference a − b on the same prompts)."""
    headers, rows = _pairwise_cells(pairwise or [])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pairwise_html(pairwise: list[dict]) -> str:
    headers, rows = _pairwise_cells(pairwise or [])
    e = html.escape
    return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
            + "</tbody></table>")


def _by_kind_cells(by_kind: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """Rows: instruction kinds; columns: models; cells 'followed/asked (share)'."""
    models = list(by_kind)
    kinds = sorted({kind for counts in by_kind.values() for kind in counts})

    def cell(c: dict | None) -> str:
        return "–" if not c else f"{c['followed']}/{c['asked']} ({c['followed'] / c['asked']:.2f})"

    return ["instruction kind", *models], [[kind, *(cell(by_kind[m].get(kind)) for m in models)] for kind in kinds]


def _table_html(table: list[dict], baseline: str | None) -> str:
    headers, rows, leg = _table_cells(table or [], baseline)
    e = html.escape
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    if leg:
        out.append('<ul class="legend">' + "".join(f"<li><strong>{e(h)}</strong>: {e(t)}</li>" for h, t in leg)
                   + "</ul>")
    return "\n".join(out)


# ---------------------------------------------------------------- heatmaps
def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def token_color(value: float | None, scale: float) -> tuple[int, int, int]:
    """Diverging colour: red for negative, white at 0, green for positive, saturating at |value| = scale."""
    v = _finite(value)
    if v is None:
        return (204, 204, 204)
    t = max(-1.0, min(1.0, v / scale)) if scale > 0 else 0.0
    end = _POS if t >= 0 else _NEG
    a = abs(t)
    return tuple(round(255 + (c - 255) * a) for c in end)  # type: ignore[return-value]


def _heat_scale(heatmaps: list[dict]) -> float:
    vals = [abs(f) for h in heatmaps for v in h.get("values") or [] if (f := _finite(v)) is not None]
    return max(vals, default=0.0)


def _token_html(tok: str) -> str:
    out = []
    for ch in tok:
        if ch == " ":
            out.append('<span class="ws">·</span>')
        elif ch == "\n":
            out.append('<span class="ws">↵</span>\n')
        elif ch == "\t":
            out.append('<span class="ws">→</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out) or '<span class="ws">∅</span>'


def _md_token(tok: str) -> str:
    vis = tok.replace(" ", "·").replace("\n", "↵").replace("\t", "→").replace("|", "\\|") or "∅"
    return f"`` {vis} ``" if "`" in vis else f"`{vis}`"


def _fmt_val(v: Any) -> str:
    f = _finite(v)
    return "nan" if f is None else f"{f:+.3f}"


def _heatmap_html(h: dict, scale: float) -> str:
    e = html.escape
    parts = [f"<h3>{e(str(h.get('title', '')))}</h3>" if h.get("title") else ""]
    if h.get("prompt"):
        parts.append(f'<p class="prompt"><strong>Prompt:</strong> {e(str(h["prompt"]))}</p>')
    spans = []
    for tok, v in zip(h.get("tokens") or [], h.get("values") or []):
        r, g, b = token_color(v, scale)
        fg = "#fff" if (_finite(v) is not None and scale > 0 and abs(_finite(v)) / scale > 0.6) else "#111"
        f = _finite(v)
        tip = repr(f) if f is not None else "nan"
        spans.append(f'<span class="tok" style="background:rgb({r},{g},{b});color:{fg}" '
                     f'title="{e(tip, quote=True)}">{_token_html(str(tok))}</span><wbr>')
    parts.append('<div class="heat">' + "".join(spans) + "</div>")
    vals = [f for v in h.get("values") or [] if (f := _finite(v)) is not None]
    meta = f"{len(vals)} tokens, sum {sum(vals):+.3f}"
    if h.get("label"):
        meta = f"{h['label']}; " + meta
    parts.append(f'<p class="meta">{e(meta)}</p>')
    return "\n".join(p for p in parts if p)


def _heat_legend_html(scale: float, label: str) -> str:
    steps = [i / 5 for i in range(-5, 6)]
    cells = "".join(
        f'<span class="tok" style="background:rgb{token_color(s * scale, scale)}">&nbsp;&nbsp;&nbsp;</span>'
        for s in steps)
    return (f'<p class="meta">colour scale ({html.escape(label)}): '
            f"{-scale:+.3f} {cells} {scale:+.3f} &nbsp;(white = 0; hover a token for its exact value; "
            "· marks a space, ↵ a newline)</p>")


def _heatmap_md(h: dict) -> list[str]:
    lines = [f"### {h.get('title', 'heatmap')}", ""]
    if h.get("prompt"):
        lines += [f"Prompt: {h['prompt']}", ""]
    if h.get("label"):
        lines += [f"Value: {h['label']}", ""]
    lines += ["| # | token | value |", "|---:|---|---:|"]
    for i, (tok, v) in enumerate(zip(h.get("tokens") or [], h.get("values") or [])):
        lines.append(f"| {i} | {_md_token(str(tok))} | {_fmt_val(v)} |")
    vals = [f for v in h.get("values") or [] if (f := _finite(v)) is not None]
    lines += ["", f"Sum over tokens: {sum(vals):+.3f}", ""]
    return lines


# ---------------------------------------------------------------- misc sections
def _fence(text: str) -> str:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _setup_items(setup: dict) -> list[tuple[str, str]]:
    items = []
    for k, v in setup.items():
        if k == "versions" and isinstance(v, dict):
            items.append(("versions", ", ".join(f"{p} {ver}" for p, ver in v.items())))
        elif k == "wall_time_s":
            items.append(("wall time", format_duration(v)))
        elif isinstance(v, (dict, list)):
            items.append((k, json.dumps(v, default=str)))
        else:
            items.append((k, str(v)))
    return items


def _phase_rows(phase_times: dict) -> list[tuple[str, str, str]]:
    vals = {k: f for k, v in phase_times.items() if (f := _finite(v)) is not None}
    total = sum(vals.values())
    rows = [(k, format_duration(v), f"{100 * v / total:.0f}%" if total > 0 else "–") for k, v in vals.items()]
    rows.append(("total", format_duration(total), "100%" if total > 0 else "–"))
    return rows


def _sample_title(s: dict) -> str:
    t = str(s.get("model", "sample"))
    if _finite(s.get("gold")) is not None:
        t += f" (gold {float(s['gold']):.3f})"
    return t


# ---------------------------------------------------------------- writer
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
 padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.kv td{text-align:left}.legend,.meta{font-size:.85em;color:#555}
img{max-width:100%;height:auto}
.heat{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;white-space:pre-wrap;line-height:1.9;
 border:1px solid #eee;padding:.5em;border-radius:4px}
.tok{padding:1px 1px;margin-right:1px;border-radius:2px;outline:1px solid rgba(0,0,0,.06)}
.ws{opacity:.4}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap;border-radius:4px}
"""


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` and ``out_dir/plots/*.png``; return (md, html)."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    e = html.escape

    title = str(results.get("title") or "rto report")
    table = results.get("table") or []
    baseline = results.get("baseline")
    curves = {m: rows for m, rows in (results.get("curves") or {}).items() if rows}
    phase_times = results.get("phase_times") or {}
    heatmaps = [h for h in results.get("heatmaps") or [] if h.get("tokens")]
    colors = method_colors([str(r.get("model")) for r in table] + list(curves))

    curves_png = plot_curves(curves, plots_dir / "curves.png", colors) if curves else None
    times_png = plot_times(phase_times, curves, plots_dir / "times.png") if (phase_times or curves) else None

    def img(p: Path, alt: str) -> str:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{e(alt, quote=True)}">'

    md: list[str] = [f"# {title}", ""]
    ht: list[str] = [f"<h1>{e(title)}</h1>"]

    if results.get("summary"):
        md += [f"- {line}" for line in results["summary"]] + [""]
        ht.append("<ul>" + "".join(f"<li>{e(str(line))}</li>" for line in results["summary"]) + "</ul>")

    md += ["## Comparison", ""]
    ht.append("<h2>Comparison</h2>")
    if baseline:
        md += [f"Win rates are against `{baseline}`.", ""]
        ht.append(f"<p>Win rates are against <code>{e(str(baseline))}</code>.</p>")
    md += [format_table_markdown(table, baseline)]
    ht.append(_table_html(table, baseline))

    if results.get("methods"):
        intro = "How each model was made (from the record its stage saved beside the weights)."
        md += ["## Models", "", intro, "", "| model | method |", "|---|---|"]
        md += [f"| {label} | {method} |" for label, method in results["methods"].items()] + [""]
        ht += ["<h2>Models</h2>", f"<p>{e(intro)}</p>", "<table><thead><tr><th>model</th><th>method</th></tr></thead>"
               "<tbody>" + "".join(f"<tr><td>{e(label)}</td><td>{e(method)}</td></tr>"
                                   for label, method in results["methods"].items()) + "</tbody></table>"]

    if results.get("pairwise"):
        intro = ("Every pair of models on the same prompts: the paired gold difference a − b with its 95% interval "
                 "and a's win rate over b (ties count half); the first line is the headline comparison.")
        md += ["## Paired comparisons", "", intro, "", format_pairwise_markdown(results["pairwise"])]
        ht += ["<h2>Paired comparisons</h2>", f"<p>{e(intro)}</p>", _pairwise_html(results["pairwise"])]

    if results.get("by_kind"):
        intro = "Constraints followed per instruction kind (followed / asked, and the share), for each model."
        headers, rows = _by_kind_cells(results["by_kind"])
        md += ["## Per instruction kind", "", intro, "", "| " + " | ".join(headers) + " |",
               "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        ht += ["<h2>Per instruction kind</h2>", f"<p>{e(intro)}</p>", "<table><thead><tr>"
               + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"
               + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
               + "</tbody></table>"]

    if curves_png:
        md += ["## Training curves", "", "![training curves](plots/curves.png)", ""]
        ht += ["<h2>Training curves</h2>", img(curves_png, "training curves")]

    if times_png or phase_times:
        md += ["## Time", ""]
        ht.append("<h2>Time</h2>")
        if times_png:
            md += ["![time per phase](plots/times.png)", ""]
            ht.append(img(times_png, "time per phase"))
        if phase_times:
            rows = _phase_rows(phase_times)
            md += ["| phase | wall time | share |", "|---|---:|---:|"]
            md += [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]
            ht.append("<table><tr><th>phase</th><th>wall time</th><th>share</th></tr>" + "".join(
                f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td></tr>" for a, b, c in rows) + "</table>")

    if heatmaps:
        scale = _heat_scale(heatmaps)
        labels = list(dict.fromkeys(str(h["label"]) for h in heatmaps if h.get("label")))
        label = " / ".join(labels) or "value"
        md += ["## Per-token credit", "",
               f"Per-token values of {label}; scale shared across heatmaps, max |value| = {scale:.3f}. "
               "`·` marks a space, `↵` a newline.", ""]
        ht += ["<h2>Per-token credit</h2>", _heat_legend_html(scale, label)]
        for h in heatmaps:
            md += _heatmap_md(h)
            ht.append(_heatmap_html(h, scale))

    if results.get("samples"):
        md += ["## Sample responses", ""]
        ht.append("<h2>Sample responses</h2>")
        for s in results["samples"]:
            resp = str(s.get("response", ""))
            fence = _fence(resp)
            md += [f"### {_sample_title(s)}", ""]
            if s.get("prompt"):
                md += ["> " + line for line in str(s["prompt"]).splitlines()] + [""]
            md += [f"{fence}text", resp, fence, ""]
            ht.append(f"<h3>{e(_sample_title(s))}</h3>")
            if s.get("prompt"):
                ht.append(f'<p class="prompt"><strong>Prompt:</strong> {e(str(s["prompt"]))}</p>')
            ht.append(f"<pre>{e(resp)}</pre>")

    if results.get("setup"):
        items = _setup_items(results["setup"])
        md += ["## Setup", "", "| | |", "|---|---|"]
        md += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in items] + [""]
        ht.append('<h2>Setup</h2><table class="kv">' + "".join(
            f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in items) + "</table>")

    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {line}" for line in results["notes"]] + [""]
        ht.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(str(n))}</li>" for n in results["notes"]) + "</ul>")

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(ht) + "\n</body></html>\n")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
