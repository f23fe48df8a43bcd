"""Every saved model folder carries a model card (README.md) in the hub's format."""

from __future__ import annotations

from pathlib import Path

import yaml

from rto.cards import model_card
from rto.models import ValueModel, load_causal_lm, load_tokenizer, save_model
from rto.runtime import Run
from rto.stages.dpo import DPOConfig
from rto.stages.ppo import PPOConfig


def front_matter(card: str) -> tuple[dict, str]:
    """(the YAML front matter, the text after it); the card must start with '---'."""
    assert card.startswith("---\n")
    head, text = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), text


def test_a_card_names_base_model_stage_objective_data_hyperparameters_and_results():
    config = {"out": "runs/dpo", "model": "smollm2-135m-instruct", "pairs": "runs/pairs/pairs.jsonl", "lr": 5e-5,
              "threads": 2, "report_to": "tensorboard"}
    meta = {"stage": "dpo", "loss": "ipo", "beta": 0.1, "reference": "smollm2-135m-instruct"}
    head, text = front_matter(model_card(meta, config, {"heldout_accuracy": 0.625}, "dpo --loss ipo"))
    assert head["library_name"] == "transformers"
    assert head["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's source on the hub
    assert {"rto", "rlhf", "dpo", "ipo"} <= set(head["tags"])
    assert "**Base model:** `smollm2-135m-instruct`" in text and "`rto dpo --loss ipo`" in text
    assert "loss ipo, beta 0.1" in text and "`runs/pairs/pairs.jsonl`" in text
    assert "| lr | 5e-05 |" in text and "| heldout_accuracy | 0.625 |" in text
    assert "| threads |" not in text and "| out |" not in text  # how the run went is not a hyperparameter


def test_a_local_base_model_stays_out_of_the_front_matter(tmp_path):
    head, text = front_matter(model_card({}, {"policy": str(tmp_path)}, role="policy"))
    assert "base_model" not in head and f"`{tmp_path}`" in text


def test_save_model_writes_a_card_and_the_finished_run_completes_it(tmp_path, tiny_model):
    cfg = DPOConfig(out=str(tmp_path / "dpo"), model=tiny_model, pairs="my/pairs.jsonl", lr=1e-4, progress=False)
    run = Run(cfg.out, cfg, stage="dpo --loss dpo")
    model, tokenizer = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    folder = save_model(model, tokenizer, Path(cfg.out) / "model", meta={"stage": "dpo", "loss": "dpo", "beta": 0.1})
    head, text = front_matter((folder / "README.md").read_text())
    assert head["library_name"] == "transformers" and "dpo" in head["tags"]
    assert f"**Base model:** `{tiny_model}`" in text and "`my/pairs.jsonl`" in text and "| lr | 0.0001 |" in text
    assert "## Results" not in text  # not known yet

    run.finish({"heldout_accuracy": 0.75})
    head, text = front_matter((folder / "README.md").read_text())
    assert "| heldout_accuracy | 0.75 |" in text and "`rto dpo --loss dpo`" in text
    assert not list(folder.glob(".card-*"))


def test_a_value_model_card_says_how_to_load_its_head(tmp_path, tiny_model):
    cfg = PPOConfig(out=str(tmp_path / "ppo"), policy=tiny_model, reward_model=tiny_model, reward="sparse",
                    progress=False)
    run = Run(cfg.out, cfg, stage="ppo --reward sparse")
    critic = ValueModel.from_pretrained(tiny_model)
    critic.meta = {"trained_on": "pairs.jsonl", "reward_mean": 0.5, "reward_std": 2.0}
    save_model(critic, load_tokenizer(tiny_model), Path(cfg.out) / "critic")
    run.finish({"final_gold": 0.25})
    head, text = front_matter((Path(cfg.out) / "critic" / "README.md").read_text())
    assert "reward-model" in head["tags"] and "ValueModel.from_pretrained" in text
    assert text.startswith("\n# critic of `rto ppo --reward sparse`") and "| final_gold | 0.25 |" in text
    assert f"**Base model:** `{tiny_model}`" in text  # the reward model the critic started from


def test_an_adapter_card_names_its_base_and_loads_with_peft():
    card = model_card({"stage": "dpo", "loss": "dpo", "adapter": "lora", "base_model": "smollm2-135m-instruct",
                       "base_fingerprint": "abc"}, {"model": "some/other-model"}, stage="dpo --loss dpo")
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the adapter's base, not the config's
    assert "AutoPeftModelForCausalLM.from_pretrained(folder)" in card and "AutoModelForCausalLM" not in card
    whole = model_card({"stage": "dpo", "loss": "dpo"}, {"model": "smollm2-135m-instruct"}, stage="dpo")
    assert yaml.safe_load(whole.split("---")[1])["library_name"] == "transformers"
