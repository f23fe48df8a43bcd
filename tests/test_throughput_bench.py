"""The throughput benchmark's pure parts: FLOP model, argument handling, result schema (no model runs, no installs)."""

from __future__ import annotations

import json

import pytest

from benchmarks import throughput as tb
from benchmarks._flops import SMOLLM2_135M, ModelShape, generation_flops, mfu, phase_flops, weight_matrices
from benchmarks._machine import cpu_info, decode_step_floor, matmul_shapes, native_bf16

# hidden 4, intermediate 8, 2 layers, vocab 10, 2 heads of 2, 1 KV head:
# a layer has q, o 4x4 (32), k, v 4x2 (16), MLP 3 x 4x8 (96) = 144 weights; the LM head 4x10 = 40
TINY = ModelShape(hidden=4, intermediate=8, layers=2, vocab=10, heads=2, kv_heads=1)


def test_parameter_counts():
    assert (TINY.layer_params, TINY.head_params) == (144, 40)
    # SmolLM2-135M: 30 layers x 3,538,944 + 576 x 49,152 = 134.48M weight-matrix parameters (134.5M in all)
    assert SMOLLM2_135M.layer_params == 3_538_944
    assert SMOLLM2_135M.layer_params * 30 + SMOLLM2_135M.head_params == 134_479_872


def test_decode_step_floor_streams_every_weight_matrix():
    weights = weight_matrices(SMOLLM2_135M)
    assert len(weights) == 7 * 30 + 1 and weights[-1] == (49152, 576)
    assert sum(o * i for o, i in weights) == SMOLLM2_135M.layer_params * 30 + SMOLLM2_135M.head_params
    tiny = ModelShape(hidden=16, intermediate=32, layers=2, vocab=64, heads=4, kv_heads=2)
    floor = decode_step_floor(weight_matrices(tiny), rows=4, repeats=2)
    assert floor["weights_mb"] == pytest.approx(sum(o * i for o, i in weight_matrices(tiny)) * 4 / 2**20)
    assert floor["step_s"] > 0 and floor["ceiling_tokens_per_s"] == pytest.approx(4 / floor["step_s"])


def test_generation_flops_by_hand():
    # 2 prompts of 3 tokens, 2 new tokens: 4 positions through 2 layers, LM head at 2 positions, per sequence
    assert generation_flops(TINY, rollout=2, prompt=3, response=2) == 2 * 2 * (144 * 2 * 4 + 40 * 2)


def test_phase_flops_by_hand():
    # rollout 2 x (3 + 2) tokens = 10 rows, 4 response rows; top 1 of 2 layers trains (1 shared frozen layer)
    rto = phase_flops("ours_rto", TINY, 2, 3, 2, train_layers=1)
    # trunk once, 4 roles' top layer (reference, DPO, RM, critic), 2 LM heads: the policy's log-probs are the sampler's
    assert rto["score"] == 2 * 144 * 10 * (1 + 1 * 4) + 2 * 40 * 4 * 2
    rescored = phase_flops("ours_rto", TINY, 2, 3, 2, train_layers=1, policy_rescored=True)
    assert rescored["score"] == 2 * 144 * 10 * (1 + 1 * 5) + 2 * 40 * 4 * 3  # and the policy's top layer and head
    assert rto["update"] == 2 * 6 * 144 * 10 + 4 * 40 * 4  # policy + critic top layer; frozen tied head crossed
    kept = phase_flops("ours_rto", TINY, 2, 3, 2, train_layers=1, trunk_from_sampler=True)
    assert kept["score"] == 2 * 144 * 10 * (1 * 4) + 2 * 40 * 4 * 2  # no trunk pass: the sampler's states
    assert kept["generate"] == rto["generate"] + 2 * 144 * 2 * 1  # each response's last token, bottom layer only
    assert kept["update"] == rto["update"]
    trl = phase_flops("trl_ppo", TINY, 2, 3, 2, train_layers=1)
    assert trl["score"] == 2 * 144 * 10 * 2 * 3 + 2 * 40 * 10  # 3 full stacks, reference head on every row
    assert trl["update"] == 2 * (2 * 144 * 10 + 6 * 144 * 10) + 4 * 40 * 10
    full = phase_flops("ours_ppo", TINY, 2, 3, 2, train_layers=None, ppo_epochs=2)
    assert full["score"] == 2 * 144 * 10 * 2 * 3 + 2 * 40 * 4 * 1  # 3 roles (reference, RM, critic), 1 LM head
    assert full["update"] == 2 * (2 * 6 * 144 * 10 * 2 + 6 * 40 * 4)  # head trains with the embeddings; 2 epochs
    assert rto["generate"] == trl["generate"] == full["generate"]
    with pytest.raises(ValueError, match="kind"):
        phase_flops("other", TINY, 2, 3, 2, None)


def test_mfu_divides_by_peak_and_skips_untimed_phases():
    got = mfu({"generate": 4e9, "score": 1e9}, {"generate": 2.0, "score": 0.0}, peak_gflops=4.0)
    assert got == {"generate": 0.5}


def test_quick_defaults_and_explicit_values():
    args = tb.parse_args(["--quick"])
    assert (args.reps, args.rollout_size, args.max_new_tokens) == (1, 8, 8)
    assert args.results.endswith("quick-results")  # a smoke run never replaces the committed results
    args = tb.parse_args(["--quick", "--rollout_size", "16"])
    assert args.rollout_size == 16
    args = tb.parse_args([])
    assert (args.reps, args.rollout_size, args.max_new_tokens, args.groups) == (3, 32, 40, ["all", "top6"])
    assert args.results.endswith("benchmarks/results")


@pytest.mark.parametrize("argv, message", [
    (["--rollout_size", "12"], "multiple of --minibatch_size"),
    (["--iterations", "1"], "warms up"),
    (["--groups", "all,half"], "half"),
    (["--contenders", "ours_rto,vllm"], "vllm"),
    (["--reps", "0"], "--reps"),
])
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        tb.parse_args(argv)


def test_settings_key_changes_with_what_is_measured():
    a, b = tb.parse_args([]), tb.parse_args(["--max_new_tokens", "48"])
    assert tb.settings_key(a) != tb.settings_key(b)
    assert tb.settings_key(a) == tb.settings_key(tb.parse_args(["--reps", "1", "--only", "all"]))


def test_round_order_rotates():
    kinds = ["a", "b", "c"]
    assert [tb.round_order(kinds, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                            ["a", "b", "c"]]


def test_cpu_info_and_bf16_detection():
    text = ("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    info = cpu_info(text)
    assert (info["model"], info["logical_cpus"]) == ("Test CPU", 2)
    assert info["vector_flags"] == ["avx", "avx2", "fma", "sse4_2"]
    assert not native_bf16(info["flags"])
    assert native_bf16(info["flags"] + ["avx512_bf16"]) and native_bf16(["amx_bf16"])
    assert matmul_shapes(576, 1536, 49152, 32)["lm_head"] == (32, 576, 49152)


def sample(kind: str, group: str, rep: int, seconds: float, rss: float) -> dict:
    phases = {"time_generate_s": seconds / 4, "time_score_s": seconds / 4, "time_update_s": seconds / 2}
    return {"type": "sample", "contender": kind, "group": group, "rep": rep, "exit": 0, "peak_rss_mb": rss,
            "load_s": 1.0, "log": "x.log", "command": "python -m benchmarks.throughput --only all",
            "date": "2026-12-01 18:00 UTC",
            "iterations": [{**phases, "time_iteration_s": 99.0}, {**phases, "time_iteration_s": seconds}]}


def test_results_schema_from_a_store(tmp_path):
    args = tb.parse_args(["--rollout_size", "8", "--max_new_tokens", "4", "--results", str(tmp_path / "res")])
    store = tmp_path / "samples.jsonl"
    rows = [sample("ours_rto", "all", r, s, 1000) for r, s in enumerate((4.0, 2.0, 8.0))]
    rows += [sample("trl_ppo", "all", r, 4.0, 2000) for r in range(3)]
    rows += [sample("ours_rto", "top6", 0, 1.0, 900), sample("trl_ppo", "top6", 0, 4.0, 1900)]
    rows += [{**sample("ours_ppo", "all", 0, 1.0, 1), "exit": 1, "iterations": None}]  # a failed process
    store.write_text("".join(json.dumps(r) + "\n" for r in rows))
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"peak_fp32_gflops": 100.0, "cpu": {"model": "Test CPU", "logical_cpus": 2},
                                  "best_fp32_gflops_by_rows": {"decode": 10.0, "score": 100.0, "update": 50.0}}))
    result = tb.write_results(args, store, limits, [[1] * 6] * 8, "python -m benchmarks.throughput --only report")
    saved = json.loads((tmp_path / "res" / "throughput.json").read_text())
    assert saved["ours_rto_samples_per_s"] == result["ours_rto_samples_per_s"] == 8 / 4.0  # median of 2, 4, 1 s/s
    assert saved["spreads"]["ours_rto_samples_per_s"] == [1.0, 4.0]  # the timed (last) iteration, not the first
    assert saved["trl_ppo_samples_per_s_top6"] == 2.0 and saved["ours_rto_samples_per_s_top6"] == 8.0
    assert saved["peak_rss_ours_rto_mb"] == 1000 and saved["peak_rss_trl_ppo_mb_top6"] == 1900
    assert saved["acceptance"]["rto_vs_trl_top6"] == {"ratio": 4.0, "target": ">= 2.0", "met": True}
    assert saved["acceptance"]["rto_vs_trl_all"]["met"] is True  # 2.0 vs 2.0 samples/s
    assert saved["contenders"]["all"]["ours_ppo"]["failed_runs"][0]["exit"] == 1
    assert saved["repetitions"] == {"all/ours_rto": 3, "all/trl_ppo": 3, "top6/ours_rto": 1, "top6/trl_ppo": 1}
    # MFU per phase: FLOPs of the phase / its median time / the peak rate
    entry = saved["contenders"]["all"]["ours_rto"]
    assert entry["mfu"]["update"] == pytest.approx(entry["flops"]["update"] / 2.0 / 100e9)
    assert set(saved["mfu"]["ours_rto"]) == {"generate", "score", "update"}
    assert entry["tokens_per_s"]["generate"]["median"] == 8 * 4 / 1.0
    for key in ("command", "commands", "machine", "versions", "date", "settings", "table_markdown"):
        assert key in saved
    assert "| all 30 | ours_ppo | failed |" in saved["table_markdown"]
    assert (tmp_path / "res" / "throughput.png").stat().st_size > 1000


def test_a_bf16_run_is_kept_apart_and_asks_every_contender_for_bf16(tmp_path, monkeypatch):
    import hashlib

    import rto.runtime

    monkeypatch.setattr(rto.runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="native bf16"):
        tb.parse_args(["--precision", "bf16"])
    monkeypatch.setattr(rto.runtime, "cpu_has_native_bf16", lambda: True)
    fp32, bf16 = tb.parse_args([]), tb.parse_args(["--precision", "bf16"])
    # fp32 keeps the key it had before the option existed (stored samples still match), bf16 gets its own
    old = [fp32.rollout_size, fp32.max_new_tokens, fp32.minibatch_size, fp32.ppo_epochs, fp32.iterations,
           fp32.system_prompt, fp32.before, fp32.seed]
    assert tb.settings_key(fp32) == hashlib.sha256(json.dumps(old).encode()).hexdigest()[:10] != tb.settings_key(bf16)
    models = {"base": "b", "rm": "r"}
    for args, precision in ((fp32, "fp32"), (bf16, "bf16")):
        argv = tb.ours_argv("ours_rto", 6, tmp_path, models, args)
        assert argv[argv.index("--precision") + 1] == precision
        assert tb.trl_spec(6, tmp_path, models, [], args)["bf16"] is (precision == "bf16")
    assert (tb.results_name(fp32), tb.results_name(bf16)) == ("throughput", "throughput-bf16")
    limits = {"decode_step_floor": {"ceiling_tokens_per_s": 300.0}}
    assert tb.generation_ceiling(limits, "fp32") == 300.0 and tb.generation_ceiling(limits, "bf16") is None


@pytest.mark.parametrize("groups", [["top6"], ["all", "top6"]])
def test_the_plot_title_stays_inside_the_figure(tmp_path, monkeypatch, groups):
    """A long title (machine name, date) is wrapped to the figure's width instead of running past its edges."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    close, drawn = plt.close, []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure that plot() would close
    entry = {"samples_per_s": {"median": 2.0, "min": 1.5, "max": 2.5}}
    table = {g: {k: entry for k in ("ours_rto", "ours_ppo", "trl_ppo")} for g in groups}
    title = ("one PPO iteration, SmolLM2-135M fp32, rollout 32 x 40 tokens, Intel(R) Xeon(R) Platinum 8488C "
             "Processor with a long name (2 CPUs), 2026-12-03 18:22 UTC")
    tb.plot(table, tmp_path / "plot.png", title)
    (fig,) = drawn
    fig.canvas.draw()
    (suptitle,) = [t for t in fig.findobj(Text) if t.get_text() == fig.get_suptitle()]
    box, frame = suptitle.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
    assert (tmp_path / "plot.png").stat().st_size > 0
    close(fig)


def test_the_value_labels_sit_above_the_error_bars(tmp_path, monkeypatch):
    """Each bar's median is written above its max whisker's cap, not under it, and inside the panel."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    close, drawn = plt.close, []
    monkeypatch.setattr(plt, "close", drawn.append)
    spreads = {"ours_rto": (2.0, 1.5, 2.6), "ours_ppo": (2.2, 2.1, 2.25), "trl_ppo": (1.0, 0.9, 1.4)}
    table = {"top6": {k: {"samples_per_s": {"median": m, "min": lo, "max": hi}} for k, (m, lo, hi) in spreads.items()}}
    tb.plot(table, tmp_path / "plot.png", "a title")
    (fig,) = drawn
    fig.canvas.draw()
    (ax,) = fig.axes
    for m, lo, hi in spreads.values():
        (label,) = [t for t in fig.findobj(Text) if t.get_text() == f"{m:.2f}"]
        cap_top = ax.transData.transform((0, hi))[1]  # the whisker's top in display units
        box = label.get_window_extent()
        assert cap_top <= box.y0 and box.y1 <= ax.bbox.y1
    close(fig)
