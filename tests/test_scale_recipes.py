"""The real-scale recipes (rto/recipes/paper-8b.yaml, lora-24gb.yaml) and launch configs (configs/accelerate/).

- every value the RTO paper states is checked against the paper's number (PAPER below, with its source);
- lora-24gb.yaml is paper-8b.yaml with only model names and sizes changed;
- the parameter counts and memory totals written in docs/scaling.md and the recipes' headers are recomputed from the
  real architectures (built on the meta device: no weights);
- the data preparation of docs/scaling.md, run on stand-in hub datasets, writes files rto reads;
- each recipe runs one step of every stage on tiny random models of its architectures (real configs with sizes
  shrunk, the embedded model's tokenizer), overriding only sizes and model paths;
- each accelerate config loads with accelerate's own loader, and the CPU one starts two gloo processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from rto.stages.dpo import DPOConfig
from rto.stages.pipeline import PipelineConfig, load_recipe, run, stage_configs
from rto.stages.ppo import PPOConfig
from tests.conftest import needs_deepspeed

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
DOC = ROOT / "docs" / "scaling.md"
RECIPES = ("paper-8b.yaml", "lora-24gb.yaml")
GIB = 2**30

# ---- the paper's numbers ----------------------------------------------------------------------------------------
# "DPO Meets PPO: Reinforced Token Optimization for RLHF" (arXiv 2404.18922): eq. 4.7 and section 3 of the project's
# notes (beta1 0.05, beta2 0.01 fixed, beta3 1, RM score clipped at +-10, the public script's DPO clip 0.05, gamma 1,
# Adam betas (0.9, 0.95), no weight decay, cosine schedule with 3% warm-up and a 10% floor, grad-norm clip 1.0,
# advantages whitened, temperature 1, 1024 prompts per rollout in 8 updates of 128, one epoch, value clip 0.2) and
# appendix D's tables (RM: lr 1e-6, batch 128; DPO: lr 5e-7, batch 256, beta 0.1; PPO: actor lr 8e-7; RTO: actor lr
# 5e-7; both: critic lr 9e-6, prompts and responses of at most 1024 tokens, clip 0.2, GAE lambda 0.95; maximum
# sequence length 2048; a single epoch everywhere; the 1B reward model starts from Llama-3.2-1B-Instruct and also
# starts the critic).
OPTIMIZER = {"betas": (0.9, 0.95), "weight_decay": 0.0, "warmup_ratio": 0.03, "min_lr_ratio": 0.1, "max_grad_norm": 1.0}
PPO_COMMON = {"rollout_size": 1024, "minibatch_size": 128, "ppo_epochs": 1, "group_size": 1, "max_prompt_tokens": 1024,
              "max_new_tokens": 1024, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "critic_lr": 9e-6, "clip": 0.2,
              "value_clip": 0.2, "lam": 0.95, "gamma": 1.0, "beta_kl": 0.01, "adaptive_kl": False, "beta_rm": 1.0,
              "rm_clip": 10.0, "whiten_advantages": True, "estimator": "gae", "critic": None, **OPTIMIZER}
PAPER = {
    "rm": {"model": "meta-llama/Llama-3.2-1B-Instruct", "lr": 1e-6, "batch_size": 128, "epochs": 1, **OPTIMIZER},
    "dpo": {"loss": "dpo", "beta": 0.1, "lr": 5e-7, "batch_size": 256, "epochs": 1, **OPTIMIZER},
    "ppo": {"reward": "sparse", "actor_lr": 8e-7, **PPO_COMMON},
    "rto": {"reward": "rto", "actor_lr": 5e-7, "beta_dpo": 0.05, "dpo_clip": 0.05, "granularity": "token",
            **PPO_COMMON},
}
PAPER_MAX_SEQUENCE = 2048  # rm and dpo: prompt + response tokens
ULTRAFEEDBACK_PROMPTS = 61_135  # rows of HuggingFaceH4/ultrafeedback_binarized's train_prefs (its dataset card); the
# recipe's iterations assume an RL prompt file as large (its header says to set them from `rto data check`)
LORA = {"lora": True, "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "lora_targets": "all-linear",
        "gradient_checkpointing": True}
LORA_STAGES = ("dpo", "ppo", "rto")  # the reward model and critic are separate models, trained in full

# what lora-24gb.yaml changes from paper-8b.yaml: models and sizes only
SMOL, SMOL_RM = "HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"
PPO_24GB = {"policy": SMOL, "iterations": 125, "rollout_size": 64, "minibatch_size": 8, "max_new_tokens": 512,
            "generation_batch_size": 16, "score_batch_size": 8, "max_prompt_tokens": 512, "micro_batch_size": None}
CHANGES_24GB = {
    "rm": {"model": SMOL_RM, "batch_size": 4, "max_response_tokens": 512, "max_prompt_tokens": 512,
           "micro_batch_size": None},
    "dpo": {"model": SMOL, "batch_size": 8, "max_response_tokens": 512, "max_prompt_tokens": 512,
            "micro_batch_size": None},
    "ppo": PPO_24GB, "rto": PPO_24GB,
    "eval": {"models": [f"sft={SMOL}", "dpo={run}/dpo/model", "ppo={run}/ppo/policy", "rto={run}/rto/policy"],
             "ref": SMOL, "num_prompts": 500, "max_new_tokens": 512, "batch_size": 16, "max_prompt_tokens": 512},
    "report": {"title": "RTO vs PPO on one 24 GB GPU: SmolLM2-1.7B-Instruct with LoRA, UltraFeedback, "
                         "360M reward model"},
}

# ---- the real architectures (their config.json on the hub, the fields that shape the model) --------------------
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
ARCHITECTURES = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True),
    SMOL: dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0,
        tie_word_embeddings=True),
    SMOL_RM: dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
        head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True),
}
# parameter counts of the real models (and of rank-16 adapters on all their linear layers but the output head)
PARAMS = {"meta-llama/Llama-3.1-8B-Instruct": (8_030_261_248, 41_943_040),
          "meta-llama/Llama-3.2-1B-Instruct": (1_235_814_400, 11_272_192),
          SMOL: (1_711_376_384, 18_087_936), SMOL_RM: (361_821_120, 8_683_520)}


def recipe_path(name: str) -> str:
    return str(resources.files("rto.recipes").joinpath(name))


def lora_missing() -> str | None:
    """Why the LoRA mode cannot run yet (None when rto dpo and rto ppo have all its fields)."""
    have = {f.name for f in dataclasses.fields(DPOConfig)} & {f.name for f in dataclasses.fields(PPOConfig)}
    missing = [name for name in LORA if name not in have]
    return (f"LoRA mode not in rto yet: rto dpo / rto ppo lack the fields {missing} (rto.lora.LoraOptions)"
            if missing else None)


def without_lora(recipe: dict) -> dict:
    """The recipe with the LoRA fields taken out of every stage: every role trains in full (what runs before the
    LoRA mode exists, and what a machine with room for full copies would run)."""
    return {**recipe, "stages": [{k: v for k, v in entry.items() if k not in LORA} for entry in recipe["stages"]]}


def configs(name: str, out: Path, lora: bool = True) -> dict:
    recipe = load_recipe(recipe_path(name))
    recipe = recipe if lora else without_lora(recipe)
    return {stage: cfg for stage, _, cfg in stage_configs(recipe, name, {"out": str(out)})}


@pytest.fixture(params=[True, False], ids=["lora", "full-weights"])
def lora(request) -> bool:
    if request.param and (reason := lora_missing()):
        pytest.skip(reason)
    return request.param


# ---- the paper's numbers -----------------------------------------------------------------------------------------
def test_paper_recipe_holds_the_papers_numbers(tmp_path, lora):
    run_dir = tmp_path / "run"
    cfg = configs("paper-8b.yaml", run_dir, lora)
    for stage, expected in PAPER.items():
        for field, value in expected.items():
            actual = getattr(cfg[stage], field)
            assert (tuple(actual) if field == "betas" else actual) == value, (stage, field)
    for stage in ("rm", "dpo"):  # the paper's maximum sequence length
        assert cfg[stage].max_prompt_tokens + cfg[stage].max_response_tokens == PAPER_MAX_SEQUENCE
        assert cfg[stage].pairs == "data/ultrafeedback/train_prefs.jsonl"
    policy = "meta-llama/Llama-3.1-8B-Instruct"
    # one reference everywhere: the DPO model starts from the policy's start, which is PPO's and eval's reference
    assert cfg["dpo"].model == cfg["ppo"].policy == cfg["rto"].policy == cfg["eval"].ref == policy
    assert cfg["dpo"].ref is None and cfg["ppo"].ref is None and cfg["rto"].ref is None
    assert cfg["rto"].dpo_model == str(run_dir / "dpo" / "model")
    for stage in ("ppo", "rto"):  # the 1B reward model scores and starts the critic; one pass over the prompts
        assert cfg[stage].reward_model == str(run_dir / "rm" / "model") and cfg[stage].critic is None
        assert cfg[stage].prompts == "data/ultrafeedback/rl_prompts.jsonl"
        assert cfg[stage].iterations * cfg[stage].rollout_size >= ULTRAFEEDBACK_PROMPTS
        assert (cfg[stage].iterations - 1) * cfg[stage].rollout_size < ULTRAFEEDBACK_PROMPTS
    assert cfg["rto"].rollout_size // cfg["rto"].minibatch_size == 8  # 8 updates per rollout
    # the paper's batches, in micro-batches of 4 per GPU (16 pairs, 32 pairs, 16 responses per GPU and step)
    assert {stage: cfg[stage].micro_batch_size for stage in ("rm", "dpo", "ppo", "rto")} == dict.fromkeys(
        ("rm", "dpo", "ppo", "rto"), 4)
    assert all(c.precision == "bf16" and c.train_layers is None for c in cfg.values() if hasattr(c, "train_layers"))
    assert cfg["eval"].prompts == "data/ultrafeedback/test_prompts.jsonl"


def test_lora_fields_are_on_the_policy_roles_only():
    stages = {e["name"]: e for e in load_recipe(recipe_path("paper-8b.yaml"))["stages"]}
    for name, entry in stages.items():
        present = {k: entry[k] for k in LORA if k in entry}
        assert present == (LORA if name in LORA_STAGES else {}), name
    # written in each stage, never in `defaults`: a recipe's defaults skip stages without the field, so a missing
    # LoRA mode would silently mean full fine-tuning of an 8B model instead of a refusal
    assert not set(LORA) & set(load_recipe(recipe_path("paper-8b.yaml"))["defaults"])


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_parse_with_their_lora_fields(name, tmp_path):
    if reason := lora_missing():
        pytest.skip(reason)
    cfg = configs(name, tmp_path / "run")
    for stage in LORA_STAGES:
        assert {k: getattr(cfg[stage], k) for k in LORA} == LORA


def test_24gb_recipe_is_the_paper_recipe_with_smaller_models_and_sizes(tmp_path, lora):
    run_dir = tmp_path / "run"
    paper, small = configs("paper-8b.yaml", run_dir, lora), configs("lora-24gb.yaml", run_dir, lora)
    assert paper.keys() == small.keys()
    for stage in paper:
        changed = CHANGES_24GB.get(stage, {})
        for field, value in changed.items():
            filled = json.loads(json.dumps(value).replace("{run}", str(run_dir)))
            assert getattr(small[stage], field) == filled, (stage, field)
        for field in vars(paper[stage]):
            if field not in changed and field != "out":
                assert getattr(small[stage], field) == getattr(paper[stage], field), (stage, field)
    assert small["rto"].rollout_size // small["rto"].minibatch_size == 8  # the paper's 8 updates per rollout
    assert small["rto"].iterations * small["rto"].rollout_size == 8000  # ~1/8 of UltraFeedback's prompts


# ---- parameter counts and memory: the doc's and the headers' numbers, recomputed ----------------------------------
def real_model(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[name]))


def counts(name: str, rank: int = 16) -> tuple[int, int]:
    """(parameters, LoRA parameters): a rank-r adapter on a linear layer (in -> out) holds r * (in + out)."""
    model = real_model(name)
    lora = sum(rank * (m.in_features + m.out_features) for path, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and path != "lm_head")
    return sum(p.numel() for p in model.parameters()), lora


def one_base_gib(policy: str, reward: str) -> float:
    """LoRA one-base mode, weights in fp32: base 4 B, trained adapter 16 B (weight, gradient, two AdamW moments),
    frozen DPO adapter 4 B, reward model 4 B, critic (trained in full) 16 B per parameter."""
    (n, a), (m, _) = PARAMS[policy], PARAMS[reward]
    return (4 * n + 16 * a + 4 * a + 4 * m + 16 * m) / GIB


def test_parameter_counts_and_memory_totals_are_computed_right():
    text, header = DOC.read_text(), Path(recipe_path("lora-24gb.yaml")).read_text()
    for name, (params, adapter) in PARAMS.items():
        assert counts(name) == (params, adapter), name
    for name in ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"):  # the doc's counts
        assert f"{PARAMS[name][0]:,}" in text, name
    assert f"{PARAMS['meta-llama/Llama-3.1-8B-Instruct'][1]:,}" in text
    for name in (SMOL, SMOL_RM):  # the 24 GB header's
        assert f"{PARAMS[name][0]:,}" in header, name
    assert f"{PARAMS[SMOL][1]:,}" in header
    llama, llama_rm = "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"
    full = (16 * PARAMS[llama][0] + 2 * 4 * PARAMS[llama][0] + 20 * PARAMS[llama_rm][0]) / GIB
    assert f"{one_base_gib(llama, llama_rm):.2f} GiB" == "53.72 GiB" and "53.72 GiB" in text
    assert f"{full:.2f} GiB" == "202.51 GiB" and "202.51 GiB" in text
    assert f"{one_base_gib(SMOL, SMOL_RM):.2f} GiB" == "13.45 GiB" and "13.45 GiB" in header


def test_fsdp_full_fine_tuning_memory_is_computed_right():
    """docs/scaling.md's per-GPU memory of the 8B setting without LoRA under FSDP on 8 GPUs: decoder layers
    sharded (trained 16 B, frozen 4 B per weight), embeddings, final norms and heads whole."""
    text = DOC.read_text()
    llama, llama_rm = real_model("meta-llama/Llama-3.1-8B-Instruct"), real_model("meta-llama/Llama-3.2-1B-Instruct")
    split = []
    for model in (llama, llama_rm):
        layers = sum(p.numel() for p in model.model.layers.parameters())
        split.append((layers, sum(p.numel() for p in model.parameters()) - layers))
    (big_layers, big_rest), (rm_layers, rm_rest) = split
    for n in (big_layers, big_rest, rm_layers, rm_rest):
        assert f"{n:,}" in text
    parts = [16 * (big_layers + rm_layers) / 8, 16 * (big_rest + rm_rest), 4 * (2 * big_layers + rm_layers) / 8,
             4 * (2 * big_rest + rm_rest)]
    for part in parts:
        assert f"{part / GIB:.2f} GiB" in text
    assert f"{sum(parts) / GIB:.2f} GiB" == "50.14 GiB" and "50.14 GiB" in text
    whole_frozen = 4 * (2 * (big_layers + big_rest) + rm_layers + rm_rest)
    assert f"{(sum(parts[:2]) + whole_frozen) / GIB:.2f} GiB" == "98.82 GiB" and "98.82 GiB" in text
    assert f"{(parts[1] + parts[3]) / GIB:.2f} GiB" == "28.38 GiB" and "28.38 GiB" in text


# ---- data: the doc's preparation on stand-in hub datasets --------------------------------------------------------
def _messages(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def fake_hub(name: str, split: str | None = None, **kwargs):
    """Small datasets in the layouts of the two hub datasets the doc reads (extra columns included)."""
    from datasets import Dataset, DatasetDict

    if name == "HuggingFaceH4/ultrafeedback_binarized":
        def rows(n, tag):
            return [{"prompt": f"Question {tag}{i}: name a colour.", "prompt_id": f"{tag}{i}",
                     "chosen": _messages(f"Question {tag}{i}: name a colour.", f"Blue, like the sky {i}."),
                     "rejected": _messages(f"Question {tag}{i}: name a colour.", "I cannot say."),
                     "messages": _messages(f"Question {tag}{i}: name a colour.", f"Blue, like the sky {i}."),
                     "score_chosen": 8.0, "score_rejected": 3.0} for i in range(n)]
        data = DatasetDict({"train_prefs": Dataset.from_list(rows(6, "t")),
                            "test_prefs": Dataset.from_list(rows(4, "e"))})
    elif name == "weqweasdas/ultra_train":
        data = DatasetDict({"train": Dataset.from_list(
            [{"context_messages": [{"role": "user", "content": f"Write a line about day {i}."}], "id": str(i)}
             for i in range(6)])})
    else:
        raise AssertionError(f"the doc reads an unexpected dataset: {name}")
    return data if split is None else data[split]


def prepare_data(folder: Path, monkeypatch) -> None:
    """Run the doc's data preparation (its first python block) in `folder`, with `fake_hub` as the hub."""
    import datasets

    code = re.search(r"## Data\n.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.chdir(folder)
    exec(compile(code, str(DOC), "exec"), {})


def test_the_docs_data_preparation_writes_files_rto_reads(tmp_path, monkeypatch):
    from rto.data import check, load_preferences, load_prompts

    prepare_data(tmp_path, monkeypatch)
    data = tmp_path / "data" / "ultrafeedback"
    pairs = load_preferences(data / "train_prefs.jsonl")
    assert len(pairs) == 6 and pairs[0].chosen == "Blue, like the sky 0." and pairs[0].rejected == "I cannot say."
    assert pairs[0].prompt == [{"role": "user", "content": "Question t0: name a colour."}]
    assert load_prompts(data / "rl_prompts.jsonl")[2] == [{"role": "user", "content": "Write a line about day 2."}]
    assert len(load_prompts(data / "test_prompts.jsonl")) == 4
    assert "rows: 6" in check(data / "rl_prompts.jsonl", "prompts")
    assert set(json.loads((data / "train_prefs.jsonl").read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}


# ---- one step of every stage on tiny models of the same architectures --------------------------------------------
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16}
ONE_STEP = {  # sizes only: every stage does one optimisation step (ppo, rto: one iteration of one minibatch)
    "rm": {"batch_size": 8, "max_response_tokens": 16}, "dpo": {"batch_size": 8, "max_response_tokens": 16},
    "ppo": {"iterations": 1, "rollout_size": 4, "minibatch_size": 4, "max_new_tokens": 8, "generation_batch_size": 4,
            "score_batch_size": 4},
    "eval": {"num_prompts": 4, "max_new_tokens": 8, "batch_size": 4, "score_batch_size": 4},
}
ONE_STEP["rto"] = ONE_STEP["ppo"]


def make_tiny(name: str, folder: Path) -> str:
    """A random model with the real architecture of `name` (its config with the sizes of TINY; key-value heads
    shrunk in the same ratio), saved with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rto.models import DEFAULT_MODEL, load_tokenizer

    real, tokenizer = ARCHITECTURES[name], load_tokenizer(DEFAULT_MODEL)
    kv = max(1, TINY["num_attention_heads"] * real["num_key_value_heads"] // real["num_attention_heads"])
    config = LlamaConfig(**{**real, **TINY, "num_key_value_heads": kv, "vocab_size": len(tokenizer),
                            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                            "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def swap(value, paths: dict[str, str]):
    """`value` (a recipe or any part of it) with every model name of `paths` replaced by its path."""
    if isinstance(value, str):
        for real, path in paths.items():
            value = value.replace(real, path)
        return value
    if isinstance(value, list):
        return [swap(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: swap(v, paths) for k, v in value.items()}
    return value


def tiny_recipe(name: str, tmp_path: Path, lora: bool, models: Path | None = None) -> tuple[Path, Path]:
    """The recipe with its models swapped for tiny ones, its sizes for ONE_STEP's and its run folder in tmp_path.
    The tiny models are made in `models` (default tmp_path / "models"); one already made there is reused (make_tiny
    is seeded: the same architecture gives the same model)."""
    recipe = load_recipe(recipe_path(name))
    recipe = recipe if lora else without_lora(recipe)
    used = [real for real in ARCHITECTURES if real in json.dumps(recipe["stages"])]
    models = models or tmp_path / "models"

    def tiny(real: str) -> str:
        folder = models / real.replace("/", "--")
        return str(folder) if (folder / "config.json").exists() else make_tiny(real, folder)

    recipe = swap(recipe, {real: tiny(real) for real in used})
    recipe["out"] = str(tmp_path / "run")
    recipe["defaults"]["max_prompt_tokens"] = 64
    for entry in recipe["stages"]:
        entry.update(ONE_STEP.get(entry["name"], {}))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "run"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """One folder for the tiny models of every parametrisation below: each architecture is made and saved once."""
    return tmp_path_factory.mktemp("tiny-architectures")


@pytest.mark.parametrize("name", RECIPES)
def test_one_step_of_every_stage_on_tiny_models(name, lora, tmp_path, monkeypatch, tiny_models):
    from rto.runtime import read_metrics

    prepare_data(tmp_path, monkeypatch)  # data/ultrafeedback/*.jsonl, where the recipe reads them
    path, run_dir = tiny_recipe(name, tmp_path, lora, tiny_models)
    run(PipelineConfig(recipe=str(path), progress=False))
    for stage in ("rm", "dpo"):
        assert [row["step"] for row in read_metrics(run_dir / stage)] == [1], stage
    for stage in ("ppo", "rto"):
        rows = read_metrics(run_dir / stage)
        assert [row["iteration"] for row in rows] == [1] and ("reward_dpo" in rows[0]) == (stage == "rto")
        saved = "adapter_config.json" if lora else "config.json"  # LoRA saves the policy as a peft adapter folder
        assert (run_dir / stage / "policy" / saved).exists() and (run_dir / stage / "critic").is_dir()
    evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert [row["model"] for row in evaluation["table"]] == ["sft", "dpo", "ppo", "rto"]
    assert all(row["n"] == 4 for row in evaluation["table"])
    assert (run_dir / "report.md").exists()
    for stage in LORA_STAGES:  # the run used the recipe's LoRA settings (none in the full-weights variant)
        saved = yaml.safe_load((run_dir / stage / "config.yaml").read_text())
        if lora:
            assert {k: saved[k] for k in LORA} == LORA, stage
        else:
            assert not saved.get("lora", False), stage


# ---- launch configs ----------------------------------------------------------------------------------------------
LAUNCH = {  # file -> (distributed type, processes, mixed precision, CPU only); MULTI_GPU = torchrun's launcher
    "ddp-cpu-2.yaml": ("MULTI_GPU", 2, "no", True),
    "ddp-8gpu.yaml": ("MULTI_GPU", 8, "bf16", False),
    "fsdp-cpu-2.yaml": ("FSDP", 2, "no", True),
    "fsdp-8gpu.yaml": ("FSDP", 8, "bf16", False),
    "zero2-cpu-2.yaml": ("DEEPSPEED", 2, "no", True),
    "zero2-8gpu.yaml": ("DEEPSPEED", 8, "bf16", False),
    "zero2-offload-8gpu.yaml": ("DEEPSPEED", 8, "bf16", False),
    "zero3-cpu-2.yaml": ("DEEPSPEED", 2, "no", True),
    "zero3-8gpu.yaml": ("DEEPSPEED", 8, "bf16", False),
}


@pytest.mark.parametrize("name", sorted(LAUNCH))
def test_launch_config_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    kind, processes, precision, cpu = LAUNCH[name]
    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.mixed_precision, config.use_cpu) == \
        (kind, processes, precision, cpu)
    assert config.num_machines == 1
    if kind == "FSDP":  # the settings rto carries out (rto.distributed.check_fsdp), nothing it would refuse
        assert config.fsdp_config == {"fsdp_version": 2, "fsdp_reshard_after_forward": True}
    else:
        assert not config.fsdp_config
    if kind == "DEEPSPEED":  # the settings rto carries out (rto.zero.check_deepspeed), nothing it would refuse
        assert config.deepspeed_config == {"zero_stage": int(name[4]), "offload_param_device": "none",
                                           "zero3_init_flag": False,
                                           "offload_optimizer_device": "cpu" if "offload" in name else "none",
                                           "gradient_accumulation_steps": 1}
    else:
        assert not config.deepspeed_config


def test_accelerates_loader_refuses_an_unknown_key(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    broken = tmp_path / "broken.yaml"
    broken.write_text((ACCELERATE_CONFIGS / "ddp-8gpu.yaml").read_text() + "num_gpus: 8\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(broken))


PROBE = """
import json, sys
import torch
import torch.distributed as dist

from rto.distributed import sharded_training
from rto.runtime import make_accelerator
from rto.zero import zero_stage

acc = make_accelerator("fp32")  # refuses a launch whose engine settings rto does not carry out (check_engine)
total = torch.tensor([acc.process_index + 1.0])
dist.all_reduce(total)
with open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w") as f:
    json.dump([acc.num_processes, acc.state.backend, acc.distributed_type.value, float(total), sharded_training(),
               zero_stage()], f)
dist.destroy_process_group()  # as rto's command line does (rto.distributed.close): else gloo may abort the exit
"""


@pytest.mark.parametrize("name, sharded, stage", [
    ("ddp-cpu-2.yaml", False, 0), ("fsdp-cpu-2.yaml", True, 0),
    pytest.param("zero2-cpu-2.yaml", False, 2, marks=needs_deepspeed),
    pytest.param("zero3-cpu-2.yaml", False, 3, marks=needs_deepspeed)])
def test_cpu_launch_config_starts_two_gloo_processes(tmp_path, name, sharded, stage):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(launcher), "launch", "--config_file", str(ACCELERATE_CONFIGS / name),
                           "--main_process_port", "0", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    reports = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    # 1 + 2 summed over gloo; with the FSDP config rto's processes shard, with a ZeRO one they run its stage
    # (accelerate itself reports MULTI_CPU: rto carries both out)
    assert reports == {f"rank{r}.json": [2, "gloo", "MULTI_CPU", 3.0, sharded, stage] for r in (0, 1)}
