import re

import pytest

from rto.report import format_duration, format_table_markdown, token_color, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curve(offset: float, n: int = 6) -> list[dict]:
    return [
        {"iteration": i, "prompts_seen": 32 * i, "gold": offset + 0.03 * i, "rm": offset * i / 4, "kl": offset * i / 8,
         "reward_dpo": 0.01 * i, "eos_rate": 0.8 + offset * i / 40, "length": 40.0 - i,
         "time_generate_s": 10.0, "time_score_s": 5.0 + 20 * offset, "time_update_s": 4.0}
        for i in range(1, n + 1)
    ]


def synthetic_results() -> dict:
    return {
        "title": "rto demo: sentiment task, tiny model",
        "summary": ["RTO beats PPO on gold score.", "Everything ran on CPU."],
        "setup": {"command": "rto demo", "machine": "2 CPU cores (AVX2)",
                  "versions": {"torch": "2.13.0", "transformers": "5.0.0"}, "seed": 0,
                  "wall_time_s": 1034.2, "precision": "fp32"},
        "table": [
            {"model": "sft", "gold_mean": 0.412, "gold_ci95": 0.05, "kl": 0.0, "rm_mean": -0.1, "length": 38.24,
             "eos_rate": 0.8, "win_rate": 0.5, "win_rate_ci95": 0.06, "n": 160},
            {"model": "dpo", "gold_mean": 0.5, "gold_ci95": 0.04, "kl": 1.2, "rm_mean": 0.2, "length": 30.0,
             "eos_rate": 0.9, "win_rate": 0.6, "win_rate_ci95": 0.05, "n": 160},
            {"model": "ppo", "gold_mean": 0.55, "gold_ci95": 0.04, "kl": 2.0, "rm_mean": 0.5, "length": 31.0,
             "eos_rate": 0.85, "win_rate": 0.65, "win_rate_ci95": 0.05, "n": 160},
            {"model": "rto", "gold_mean": 0.6123, "gold_ci95": 0.0412, "kl": 1.8, "rm_mean": 0.6, "length": 29.5,
             "eos_rate": 0.95, "win_rate": 0.7, "win_rate_ci95": 0.05, "n": 160},
        ],
        "baseline": "sft",
        "curves": {"ppo": _curve(0.4), "rto": _curve(0.45)},
        "phase_times": {"materialize": 31.0, "pairs": 120.0, "rm": 60.0, "dpo": 90.0, "ppo": 300.0,
                        "rto": 320.0, "eval": 200.0},
        "heatmaps": [
            {"title": "rto, eval prompt 3", "prompt": "Describe a rainy Monday in one sentence.",
             "tokens": ["The", " rain", " was", " lovely", "<b>", "\n", "<|im_end|>"],
             "values": [0.01, -0.02, 0.0, 0.05, -0.03, 0.001, -0.05],
             "label": "beta_dpo * log(pi_dpo/pi_ref)"},
        ],
        "samples": [{"model": "rto", "prompt": "Say something nice.", "response": "What a <lovely> day ```x```",
                     "gold": 0.8}],
        "notes": ["Numbers are from a tiny run & not significant."],
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md_path, html_path = write_report(synthetic_results(), out)
    return out, md_path, html_path, md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")


def test_files_and_pngs(report):
    out, md_path, html_path, md, _ = report
    assert md_path == out / "report.md" and html_path == out / "report.html"
    assert md_path.exists() and html_path.exists()
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"curves.png", "times.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{p.name})" in md


def test_markdown_content(report):
    *_, md, _ = report
    for model in ("sft", "dpo", "ppo", "rto"):
        assert f"| {model} |" in md
    assert "0.412 ± 0.050" in md
    assert "0.612 ± 0.041" in md
    assert "0.700 ± 0.050" in md  # win rate
    assert "| 38.2 |" in md  # length to 1 decimal
    assert "win rate vs sft" in md
    # sections in order
    idx = [md.index(s) for s in ("# rto demo", "RTO beats PPO", "## Comparison", "## Training curves", "## Time",
                                 "## Per-token credit", "## Sample responses", "## Setup", "## Notes")]
    assert idx == sorted(idx)
    assert "17 min 14 s" in md
    assert "torch 2.13.0" in md
    # heatmap rendered as token | value table, with visible whitespace
    assert "| `·lovely` | +0.050 |" in md
    assert "| `↵` | +0.001 |" in md
    # response containing ``` gets a longer fence
    assert "````text" in md


def _token_spans(page: str) -> dict[str, tuple[int, int, int]]:
    spans = re.findall(r'<span class="tok" style="background:rgb\((\d+),(\d+),(\d+)\);[^"]*" title="([^"]*)">', page)
    return {title: (int(r), int(g), int(b)) for r, g, b, title in spans}


def test_html_content(report):
    *_, page = report
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert page.count('<img src="data:image/png;base64,') == 2
    assert 'alt="training curves"' in page
    assert "0.412 ± 0.050" in page
    colors = _token_spans(page)
    r, g, b = colors["0.05"]  # max |value|: saturated green
    assert g > r + 50 and g > b + 50
    r, g, b = colors["-0.05"]
    assert r > g + 50 and r > b + 50
    r, g, b = colors["-0.02"]  # partially red, lighter than saturated
    assert r > g and r > b and g > colors["-0.05"][1]
    assert colors["0.0"] == (255, 255, 255)
    # escaping: token, sample response, and notes
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "&lt;|im_end|&gt;" in page
    assert "What a &lt;lovely&gt; day" in page
    assert "tiny run &amp; not significant" in page
    # visible whitespace and newline (the colour legend mentions "↵" anyway: look for the token's own span)
    assert '<span class="ws">·</span>lovely' in page
    assert '<span class="ws">↵</span>' in page


def test_only_table(tmp_path):
    results = {"table": [{"model": "sft", "gold_mean": 0.3}, {"model": "rto", "gold_mean": 0.4, "gold_ci95": 0.1}]}
    md_path, html_path = write_report(results, tmp_path / "r")
    md = md_path.read_text(encoding="utf-8")
    page = html_path.read_text(encoding="utf-8")
    assert "0.400 ± 0.100" in md and "| sft | 0.300 |" in md
    assert "KL to ref" not in md  # columns absent from every row are dropped
    assert "<img" not in page
    assert not (tmp_path / "r" / "plots").exists()
    for section in ("Training curves", "Per-token credit", "Setup", "Notes"):
        assert section not in md and section not in page


def test_partial_sections(tmp_path):
    results = {
        "table": [],
        "curves": {"ppo": [{"iteration": 1, "kl": 0.1}, {"iteration": 2, "kl": 0.2}], "rto": []},
        "phase_times": {"ppo": 12.0},
        "heatmaps": [{"tokens": ["a", "b"], "values": [0.0, 0.0]}, {"tokens": [], "values": []}],
    }
    md_path, html_path = write_report(results, tmp_path)
    assert (tmp_path / "plots" / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "plots" / "times.png").read_bytes()[:8] == PNG_MAGIC
    page = html_path.read_text(encoding="utf-8")
    assert _token_spans(page)["0.0"] == (255, 255, 255)  # all-zero scale does not divide by zero


def test_format_table_markdown():
    table = synthetic_results()["table"]
    text = format_table_markdown(table, "sft")
    lines = text.splitlines()
    assert lines[0].startswith("| model | gold ± 95% CI | win rate vs sft ± CI |")
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2] == "| sft | 0.412 ± 0.050 | 0.500 ± 0.060 | 0.000 | -0.100 | 38.2 | 0.800 | 160 |"
    assert "- **EOS rate**:" in text
    no_legend = format_table_markdown(table, None, legend=False)
    assert "win rate vs baseline" in no_legend and "**" not in no_legend


def test_format_duration_and_colors():
    assert format_duration(1034.2) == "17 min 14 s"
    assert format_duration(12.34) == "12.3 s"
    assert format_duration(3723) == "1 h 02 min 03 s"
    assert format_duration(None) == "–"
    assert token_color(0.0, 1.0) == (255, 255, 255)
    assert token_color(2.0, 1.0) == token_color(1.0, 1.0)  # saturates
    assert token_color(-0.5, 1.0)[0] > token_color(-0.5, 1.0)[1]
    assert token_color(0.5, 0.0) == (255, 255, 255)


def test_method_of_reads_old_and_new_records():
    from rto.stages.eval import method_of

    old = {"stage": "ppo", "reward": "rto", "beta_dpo": 0.5, "beta_rm": 1.0, "beta_kl": 0.02}  # before sources
    assert method_of(old) == ("PPO --reward rto: 0.5·dpo + 1·rm − 0.02·KL; granularity token; estimator gae; "
                              "loss token_mean")
    new = {"stage": "ppo", "reward": "rto", "sources": {"simpo": 0.1, "rm": 1.0}, "dpo_loss": "simpo",
           "beta_kl": 0.01, "granularity": "sentence", "estimator": "grpo", "group_size": 4,
           "loss_agg": "seq_mean_token_mean"}
    assert method_of(new) == ("PPO --reward rto: 0.1·simpo + 1·rm − 0.01·KL; dense source trained with simpo; "
                              "granularity sentence; estimator grpo, 4 per prompt; loss seq_mean_token_mean")
    assert method_of({"stage": "dpo", "loss": "ipo", "beta": 0.1}) == "offline ipo (beta 0.1)"
    assert method_of({}) == "as given (no rto record)"
