"""Settings are checked before any model loads, with the same rules from the command line, a --config file
and a recipe; recipes are typed like the command line; pairs never hold empty answers; eval compares every pair."""

import json
import sys

import pytest
import torch
import yaml

from rto.cli import main

BAD_SETTINGS = [  # (stage, field, value, words of the message)
    ("dpo", "batch_size", 0, "batch_size must be an integer >= 1"),
    ("ppo", "iterations", 0, "iterations must be an integer >= 1"),
    ("ppo", "minibatch_size", 0, "minibatch_size must be an integer >= 1"),
    ("dpo", "lr", -1.0, "lr must be a finite number > 0"),
    ("dpo", "lr", float("nan"), "nan"),  # the command line refuses it as a float, files by its range
    ("dpo", "epochs", 0, "epochs must be an integer >= 1"),
    ("dpo", "eval_fraction", -1.0, "eval_fraction must be a number in [0, 1)"),
    ("dpo", "max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0"),
    ("ppo", "top_p", 0.0, "top_p must be a number in (0, 1]"),
    ("eval", "temperature", 0.0, "temperature must be a finite number > 0"),
]


def _one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    return err


@pytest.mark.parametrize("stage, field, value, words", BAD_SETTINGS)
def test_bad_setting_on_the_command_line(capsys, tmp_path, stage, field, value, words):
    _one_line(capsys, [stage, f"--{field}", str(value), "--out", str(tmp_path / "o")], words)
    assert not (tmp_path / "o").exists()  # refused before the run folder, let alone a model


@pytest.mark.parametrize("stage, field, value, words", BAD_SETTINGS)
def test_bad_setting_in_a_config_file(capsys, tmp_path, stage, field, value, words):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({field: value, "out": str(tmp_path / "o")}))
    _one_line(capsys, [stage, "--config", str(config)], words)


@pytest.mark.parametrize("stage, field, value, words", BAD_SETTINGS)
def test_bad_setting_in_a_recipe(capsys, tmp_path, stage, field, value, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": [{"stage": stage, field: value}]}))
    err = _one_line(capsys, ["pipeline", str(recipe)], words)
    assert str(recipe) in err and f"'{stage}'" in err
    assert not (tmp_path / "run").exists()


def test_recipe_types_like_the_command_line(capsys, tmp_path):
    from rto.stages.pipeline import stage_configs

    source = "r.yaml"
    # YAML reads 1e-4 (no dot) as a string: typed parsing makes it the float the command line would give
    recipe = yaml.safe_load("out: run\nstages:\n  - {stage: dpo, lr: 1e-4, epochs: '2'}\n")
    assert isinstance(recipe["stages"][0]["lr"], str)
    [(_, _, cfg)] = stage_configs(recipe, source, {})
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.epochs == 2
    path = tmp_path / "bad.yaml"
    path.write_text("out: run\nstages:\n  - {stage: dpo, beta: abc}\n")
    err = _one_line(capsys, ["pipeline", str(path)], "beta")
    assert "float" in err and "abc" in err


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ""])
def test_recipe_stage_names_stay_plain(capsys, tmp_path, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": [{"stage": "rm", "name": name}]}))
    _one_line(capsys, ["pipeline", str(recipe)], "name")


def test_recipe_outputs_stay_under_its_folder(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"),
                                      "stages": [{"stage": "rm", "out": "{run}/../elsewhere"}]}))
    _one_line(capsys, ["pipeline", str(recipe)], "outside the run folder")


def test_generation_budget_beyond_the_model_positions(capsys, tmp_path, tiny_model):
    # the tiny model has 512 positions
    err = _one_line(capsys, ["pairs", "--policy", tiny_model, "--max_new_tokens", "100000", "--progress", "false",
                             "--out", str(tmp_path / "p")], "positions")
    assert "512" in err


def test_reward_model_with_zero_std_is_refused(tiny_model):
    from rto.models import ValueModel

    model = ValueModel.from_pretrained(tiny_model)
    model.meta = {"reward_mean": 0.3, "reward_std": 0.0}
    with pytest.raises(ValueError, match="std"):
        model.reward_stats()
    model.meta = {"reward_mean": 0.3, "reward_std": 2.0}
    assert model.reward_stats() == (0.3, 2.0)


def test_pairs_never_hold_empty_answers(tmp_path, tiny_model, monkeypatch):
    from rto.stages import pairs

    real = pairs.decode_responses

    def some_empty(tokenizer, ids):  # every third sample decodes to nothing but whitespace (e.g. only EOS)
        return [" \n" if i % 3 == 0 else text for i, text in enumerate(real(tokenizer, ids))]

    monkeypatch.setattr(pairs, "decode_responses", some_empty)
    summary = pairs.run(pairs.PairsConfig(out=str(tmp_path / "p"), policy=tiny_model, num_prompts=12,
                                          samples_per_prompt=3, max_new_tokens=6, progress=False, all_pairs=True))
    rows = [json.loads(line) for f in ("pairs.jsonl", "all_pairs.jsonl")
            for line in (tmp_path / "p" / f).read_text().splitlines()]
    assert rows and all(r["chosen"].strip() and r["rejected"].strip() for r in rows)
    assert summary["empty_samples"] == 12
    from rto.data import load_preferences

    load_preferences(tmp_path / "p" / "pairs.jsonl")  # the next stage's data check accepts the file


def test_every_pair_of_models_is_compared_headline_first():
    from rto.stages.eval import paired_comparisons

    gold = {"sft": torch.tensor([0.0, 0.5, 1.0]), "ppo": torch.tensor([0.5, 0.5, 0.0]),
            "rto": torch.tensor([1.0, 0.5, 0.5])}
    rows = paired_comparisons(gold, ["sft", "ppo", "rto"], ["rto", "ppo"])
    assert [(r["a"], r["b"]) for r in rows] == [("rto", "ppo"), ("ppo", "sft"), ("rto", "sft")]
    head = rows[0]
    # rto - ppo = [0.5, 0, 0.5]: mean 1/3, sample std 0.288675, half-width 1.96 * 0.288675 / sqrt(3)
    assert head["gold_delta"] == pytest.approx(1 / 3)
    assert head["gold_delta_ci95"] == pytest.approx(1.959964 * 0.2886751 / 3 ** 0.5, rel=1e-5)
    assert head["win_rate"] == pytest.approx((1 + 0.5 + 1) / 3)  # the tie counts half
    no_headline = paired_comparisons(gold, ["sft", "ppo"], ["rto", "ppo"])
    assert [(r["a"], r["b"]) for r in no_headline] == [("ppo", "sft")]


def test_dpo_model_trained_against_another_reference_is_refused(capsys, tmp_path, tiny_model):
    import shutil

    dpo = tmp_path / "dpo"
    shutil.copytree(tiny_model, dpo)
    (dpo / "rto_model.json").write_text(json.dumps({"stage": "dpo", "reference": "another/model",
                                                    "reference_fingerprint": "0123456789abcdef"}))
    err = _one_line(capsys, ["ppo", "--reward", "rto", "--policy", tiny_model, "--reward_model", tiny_model,
                             "--dpo_model", str(dpo), "--out", str(tmp_path / "o"), "--progress", "false"],
                    "trained against")
    assert "another/model" in err


def test_dpo_stage_records_its_reference(tmp_path, tiny_model):
    from rto.models import load_causal_lm, read_meta, weights_fingerprint
    from rto.stages.dpo import DPOConfig, run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "chosen": "A lovely thing.",
                                         "rejected": "A sad thing."}) + "\n" for i in range(4)))
    run(DPOConfig(out=str(tmp_path / "d"), model=tiny_model, pairs=str(pairs), batch_size=2, eval_fraction=0.0,
                  train_layers=2, progress=False, precision="fp32", lr=1e-3, warmup_ratio=0.0))
    record = read_meta(str(tmp_path / "d" / "model"))
    assert record["reference"] == tiny_model and record["beta"] == 0.1
    assert record["reference_fingerprint"] == weights_fingerprint(load_causal_lm(tiny_model))
    assert record["reference_fingerprint"] != weights_fingerprint(load_causal_lm(str(tmp_path / "d" / "model")))


def test_offline_training_runs_without_dropout(tmp_path, tiny_model):
    from rto.models import load_causal_lm
    from rto.stages import common
    from rto.stages.dpo import DPOConfig

    model = load_causal_lm(tiny_model)
    model.train()
    seen = []

    def loss_fn(epoch, items):
        seen.append(model.training)
        return sum((p ** 2).sum() for p in model.parameters() if p.requires_grad) * 0, {}

    cfg = DPOConfig(out=str(tmp_path / "o"), batch_size=2, progress=False, checkpoint_every=0)
    run = common.Run(cfg.out, cfg)
    common.fit(run, common.make_accelerator("fp32"), model, common.param_groups(model, 1e-3), [1, 2, 3, 4], cfg,
               loss_fn, "test")
    run.close()
    assert seen == [False, False]


def test_a_reference_free_model_is_refused_as_the_dpo_source(capsys, tmp_path, tiny_model):
    import shutil

    simpo = tmp_path / "simpo"
    shutil.copytree(tiny_model, simpo)
    (simpo / "rto_model.json").write_text(json.dumps({"stage": "dpo", "loss": "simpo", "reference": None}))
    # the "dpo" source reads log(pi_dpo / pi_ref), which is no reward of a reference-free model
    _one_line(capsys, ["ppo", "--reward", "custom", "--sources", "{dpo: 0.05, rm: 1.0}", "--policy", tiny_model,
                       "--reward_model", tiny_model, "--dpo_model", str(simpo), "--out", str(tmp_path / "o"),
                       "--progress", "false"], "reference-free simpo")


def test_generation_budget_of_an_adapter_is_its_base_models(capsys, tmp_path, tiny_model):
    """A LoRA adapter folder has no config of its own: the budget is checked against its base's 512 positions."""
    import json

    from rto.lora import LoraOptions, attach_adapter
    from rto.models import load_causal_lm, load_tokenizer, save_model

    adapter = tmp_path / "adapter"
    peft_model = attach_adapter(load_causal_lm(tiny_model), LoraOptions(lora=True), train_layers=2)
    save_model(peft_model, load_tokenizer(tiny_model), adapter, meta={"adapter": "lora", "base_model": tiny_model})
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    assert json.loads((adapter / "rto_model.json").read_text())["base_model"] == tiny_model
    err = _one_line(capsys, ["pairs", "--policy", str(adapter), "--max_new_tokens", "100000", "--progress", "false",
                             "--out", str(tmp_path / "p")], "positions")
    assert "512" in err


def test_adamw_runs_fused_and_updates_as_the_reference_loop():
    """Every stage's AdamW is torch's fused kernel on CPU (the per-tensor default loop cost ~1 s a step for
    135M parameters): the same update as the loop up to fp32 rounding, schedules and param groups unchanged."""
    from rto.stages.common import Optimization, make_optimizer

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(p) for p in start]
    moved, lambdas = {}, None
    for name in ("rto", "loop"):
        params = [p.clone().requires_grad_() for p in start]
        groups = [{"params": params[:1], "lr": 1e-2}, {"params": params[1:], "lr": 3e-2}]
        if name == "rto":
            opt, sched = make_optimizer(groups, 10, Optimization(warmup_ratio=0.2, weight_decay=0.1))
            assert opt.defaults["fused"] and all(g["fused"] for g in opt.param_groups)
            lambdas = sched.lr_lambdas
        else:  # torch's per-tensor loop, on the same schedule
            opt = torch.optim.AdamW(groups, betas=tuple(Optimization().betas), weight_decay=0.1, foreach=False)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        for _ in range(4):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            sched.step()
        moved[name] = torch.cat([p.detach().flatten() for p in params])
    assert not torch.equal(moved["rto"], torch.cat([p.flatten() for p in start]))
    torch.testing.assert_close(moved["rto"], moved["loop"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variables, words", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, ["ZeRO stage 0", "ddp"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}, ["ZeRO stage 4", "1, 2 or 3"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, ["zero3_init_flag"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, ["deepspeed_config_file"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, ["offload_param_device"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "nvme"}, ["nvme"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, ["--micro_batch_size"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}, ["--max_grad_norm"]),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_FSDP": "true"}, ["both FSDP and DeepSpeed"]),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, ["Megatron-LM"]),
    ({"ACCELERATE_USE_FSDP": "true"}, ["FSDP version 1", "fsdp_version: 2"]),  # accelerate's default version
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, ["FSDP_OFFLOAD_PARAMS"]),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     ["--gradient_checkpointing"]),
])
def test_an_engine_setting_rto_does_not_carry_out_is_refused(capsys, tmp_path, tiny_model, pairs_file, monkeypatch,
                                                             variables, words):
    """`accelerate launch` sets these variables from its config; on CPU accelerate would quietly run plain
    processes instead of DeepSpeed or Megatron-LM, and rto carries out FSDP2 without offloading and DeepSpeed ZeRO
    stages 1-3 with its own config only: the stage says so in one line before it starts."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    err = _one_line(capsys, ["dpo", "--model", tiny_model, "--pairs", pairs_file, "--progress", "false",
                             "--out", str(tmp_path / "d")], words[0])
    assert all(w in err for w in words) and not (tmp_path / "d" / "model").exists(), err
    for name in variables:  # the engines' switches as accelerate sets them for other configs; their settings unset
        if name.startswith("ACCELERATE_USE_"):
            monkeypatch.setenv(name, "false")
        else:
            monkeypatch.delenv(name)
    from rto.runtime import make_accelerator

    assert make_accelerator("fp32").num_processes == 1


def test_a_deepspeed_launch_without_deepspeed_names_the_extra(capsys, tmp_path, tiny_model, pairs_file, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without it gives: ImportError
    err = _one_line(capsys, ["dpo", "--model", tiny_model, "--pairs", pairs_file, "--progress", "false",
                             "--out", str(tmp_path / "d")], "rto-rlhf[deepspeed]")
    assert "not installed" in err and not (tmp_path / "d").exists()
