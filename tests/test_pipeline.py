"""The whole pipeline (pairs, SFT, RM, DPO, PPO, RTO, eval, report) on a tiny random model, ~30 s."""

import json

import yaml

from rto.cli import main
from rto.runtime import read_metrics


def _recipe(tmp_path, model):
    run = tmp_path / "run"
    ppo = dict(policy=model, reward_model="{run}/rm/model", iterations=2, rollout_size=8, minibatch_size=4,
               max_new_tokens=8)
    recipe = {
        "out": str(run),
        "defaults": {"seed": 0, "train_layers": 2, "progress": False},
        "stages": [
            {"stage": "pairs", "policy": model, "num_prompts": 24, "max_new_tokens": 8, "samples_per_prompt": 3,
             "all_pairs": True},
            {"stage": "sft", "model": model, "data": "{run}/pairs/pairs.jsonl", "batch_size": 4},
            {"stage": "rm", "model": model, "pairs": "{run}/pairs/all_pairs.jsonl", "epochs": 1, "batch_size": 4},
            {"stage": "dpo", "model": model, "pairs": "{run}/pairs/pairs.jsonl", "batch_size": 4},
            {"name": "ppo", "stage": "ppo", "reward": "sparse", **ppo},
            {"name": "rto", "stage": "ppo", "reward": "rto", "dpo_model": "{run}/dpo/model", "beta_dpo": 0.5,
             "dpo_clip": 0.5, **ppo},
            {"stage": "eval", "ref": model, "num_prompts": 8, "max_new_tokens": 8, "baseline": "sft",
             "models": [f"sft={model}", "dpo={run}/dpo/model", "ppo={run}/ppo/policy", "rto={run}/rto/policy"],
             "reward_model": "{run}/rm/model", "dpo_model": "{run}/dpo/model", "heatmap_model": "rto"},
            {"stage": "report", "out": "{run}", "eval": "{run}/eval", "pipeline": "{run}/pipeline.json",
             "curves": {"ppo": "{run}/ppo", "rto": "{run}/rto"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run


def test_whole_pipeline_on_a_tiny_model(tmp_path, tiny_model, capsys):
    recipe, run = _recipe(tmp_path, tiny_model)
    assert main(["pipeline", str(recipe)]) == 0

    pairs = [json.loads(line) for line in (run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    every = [json.loads(line) for line in (run / "pairs" / "all_pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_score"] > p["rejected_score"] for p in every)
    assert all(p in every for p in pairs)  # best-vs-worst is one of the untied pairs of its prompt
    assert len(pairs) < len(every) <= 3 * len(pairs)  # at most 3 = k(k-1)/2 untied pairs per prompt
    meta = json.loads((run / "rm" / "model" / "rto_model.json").read_text())
    assert meta["reward_std"] > 0
    for stage in ("sft", "dpo"):
        assert (run / stage / "model" / "model.safetensors").exists()
    for method in ("ppo", "rto"):
        assert (run / method / "policy" / "model.safetensors").exists()
        assert (run / method / "critic" / "value_head.safetensors").exists()
        rows = read_metrics(run / method)
        assert [r["iteration"] for r in rows] == [1, 2]
        assert ("reward_dpo" in rows[0]) == (method == "rto")
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert [r["model"] for r in ev["table"]] == ["sft", "dpo", "ppo", "rto"]
    assert ev["table"][0]["kl"] == 0.0 and all(r["n"] == 8 for r in ev["table"])
    assert ev["heatmaps"] and len(ev["heatmaps"][0]["tokens"]) == len(ev["heatmaps"][0]["values"])
    # every pair of the 4 models compared, the headline RTO vs PPO first, in eval.json and in the report
    pairwise = ev["pairwise"]
    assert len(pairwise) == 6 and (pairwise[0]["a"], pairwise[0]["b"]) == ("rto", "ppo")
    assert all(p["gold_delta_ci95"] >= 0 and 0 <= p["win_rate"] <= 1 for p in pairwise)
    assert all("kl_ci95" in r and "kl_per_token" in r for r in ev["table"])
    # the heatmaps use the beta_dpo the rto stage trained with (recorded in its policy folder), not eval's default
    assert ev["heatmaps"][0]["label"].startswith("0.5 * log")
    html = (run / "report.html").read_text()
    assert "Per-token credit" in html and "Paired comparisons" in html
    md = (run / "report.md").read_text()
    assert "| sft |" in md and "| rto − ppo |" in md
    # each model labelled by how it was made: method, sources, dense source's loss, granularity, estimator
    assert ev["methods"]["rto"] == ("PPO --reward rto: 0.5·dpo + 1·rm − 0.01·KL; dense source trained with dpo; "
                                    "granularity token; estimator gae; loss token_mean")
    assert ev["methods"]["ppo"].startswith("PPO --reward sparse: 1·rm − 0.01·KL; granularity token")
    assert ev["methods"]["dpo"] == "offline dpo (beta 0.1)" and ev["methods"]["sft"] == "as given (no rto record)"
    assert "| rto | PPO --reward rto: 0.5·dpo" in md.split("## Models")[1]
    summary = md.split("## Comparison")[0]
    assert summary.index("rto vs ppo") < summary.index("dpo: gold")  # the headline line comes first
    phases = json.loads((run / "pipeline.json").read_text())["phase_times"]
    assert set(phases) == {"pairs", "sft", "rm", "dpo", "ppo", "rto", "eval"}

    # a second run finds every stage done and only rewrites the report
    capsys.readouterr()
    assert main(["pipeline", str(recipe)]) == 0
    assert capsys.readouterr().out.count("already done") == 7
