"""Numerical guards (NaN/inf losses, gradients, rewards), tokenizer compatibility across roles, over-long prompts."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rto.checkpoint import latest_checkpoint, load_checkpoint
from rto.cli import main
from rto.runtime import NonFiniteError, read_metrics
from rto.stages.common import PairTraining, fit, start


def linear_fit(tmp_path, losses, **cfg):
    """fit() on a 2-parameter model over 12 items (3 steps per epoch, 2 epochs); losses(step, model) -> loss."""
    cfg = PairTraining(out=str(tmp_path / "run"), batch_size=4, epochs=2, progress=False, lr=0.1, **cfg)
    run, accelerator = start(cfg, "test")
    model = torch.nn.Linear(1, 1)
    step = [0]

    def loss_fn(epoch, items):
        step[0] += 1
        return losses(step[0], model), {}

    try:
        fit(run, accelerator, model, [{"params": list(model.parameters()), "lr": cfg.lr}], list(range(12)), cfg,
            loss_fn, "test")
    finally:
        run.close()
    return model, read_metrics(run.dir), (run.dir / "log.txt").read_text()


def square(model):
    return model(torch.ones(1)).pow(2).sum()


def test_a_nan_loss_skips_that_update_only(tmp_path):
    model, rows, log = linear_fit(tmp_path, lambda s, m: square(m) * (float("nan") if s == 2 else 1.0))
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1, 1]
    assert "test: step 2: NaN/inf loss; update skipped" in log
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_gradient_with_a_finite_loss_is_caught(tmp_path):
    # d/dw sqrt(|0 * w|) = inf * 0 = NaN while the loss itself is finite
    bad = lambda s, m: square(m) + (m.weight.sum() * 0).abs().sqrt() if s == 4 else square(m)  # noqa: E731
    model, rows, log = linear_fit(tmp_path, bad)
    assert "step 4: NaN/inf gradient" in log and math.isfinite(rows[3]["loss"])
    assert rows[-1]["skipped_steps"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_bad_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"step 5, 3 updates in a row.*last good checkpoint is .*step-00000004"):
        linear_fit(tmp_path, lambda s, m: square(m) * (float("inf") if s >= 3 else 1.0), checkpoint_every=2,
                   max_nonfinite_steps=2)
    last = latest_checkpoint(tmp_path / "run")
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.AdamW(model.parameters())
    load_checkpoint(last, {"model": model}, {"optimizer": opt})
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "run" / "DONE").exists()


def ppo_args(tiny_model, out, *extra):
    return ["ppo", "--reward", "sparse", "--policy", tiny_model, "--reward_model", tiny_model, "--iterations", "2",
            "--rollout_size", "4", "--minibatch_size", "4", "--max_new_tokens", "4", "--train_layers", "2",
            "--progress", "false", "--out", str(out), *extra]


def nan_terms(paid):
    """The same reward terms, every one NaN."""
    return type(paid)({name: term * float("nan") for name, term in paid.terms.items()}, paid.clipfrac)


def nan_rewards(monkeypatch):
    import rto.stages.ppo as ppo

    real = ppo.compose_rewards
    monkeypatch.setattr(ppo, "compose_rewards", lambda *a, **k: nan_terms(real(*a, **k)))


def test_ppo_skips_a_rollout_with_nan_rewards(tmp_path, tiny_model, monkeypatch):
    nan_rewards(monkeypatch)
    assert main(ppo_args(tiny_model, tmp_path / "p", "--max_nonfinite_steps", "5")) == 0
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "p")] == [1, 2]
    assert "NaN/inf reward in the rollout; update skipped" in (tmp_path / "p" / "log.txt").read_text()
    start = load_file(f"{tiny_model}/model.safetensors")
    for name, tensor in load_file(tmp_path / "p" / "policy" / "model.safetensors").items():
        assert tensor.equal(start[name]), name  # no update ever reached the policy


def test_ppo_stops_with_a_clear_message(tmp_path, tiny_model, monkeypatch, capsys):
    nan_rewards(monkeypatch)
    assert main(ppo_args(tiny_model, tmp_path / "p", "--max_nonfinite_steps", "0")) == 1
    err = capsys.readouterr().err
    assert "rto ppo: stopped: ppo (sparse): NaN/inf reward in the rollout at iteration 1" in err
    assert "Traceback" not in err and not (tmp_path / "p" / "policy").exists()


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory, tiny_model):
    """The tiny model with one token added to its tokenizer (and embeddings)."""
    from transformers import AutoModelForCausalLM

    from rto.models import load_tokenizer

    folder = tmp_path_factory.mktemp("other") / "model"
    tokenizer = load_tokenizer(tiny_model)
    tokenizer.add_tokens(["<zz>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def pairs_file(tmp_path, prompts):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": "Lovely.", "rejected": "Awful."}) + "\n"
                            for p in prompts))
    return str(path)


@pytest.mark.parametrize("stage", ["dpo", "ppo", "eval"])
def test_roles_with_different_tokenizers_are_refused_at_start(tmp_path, tiny_model, other_tokenizer_model, capsys,
                                                               stage):
    if stage == "dpo":
        argv = ["dpo", "--model", tiny_model, "--ref", other_tokenizer_model,
                "--pairs", pairs_file(tmp_path, ["Hi?"] * 4), "--out", str(tmp_path / "d")]
    elif stage == "ppo":
        argv = ppo_args(tiny_model, tmp_path / "p")[:-2] + ["--out", str(tmp_path / "p"), "--reward_model",
                                                           other_tokenizer_model]
    else:
        argv = ["eval", "--ref", tiny_model, "--models", f"[a={tiny_model}, b={other_tokenizer_model}]",
                "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and other_tokenizer_model in err and "'<zz>'" in err


def test_over_long_prompts_are_skipped_and_counted(tmp_path, tiny_model, capsys):
    long = "tell me about tea " * 40
    data = pairs_file(tmp_path, ["Hi?", long, "Say something kind.", long, "Why?", "Who?"])
    argv = ["sft", "--model", tiny_model, "--data", data, "--max_prompt_tokens", "64", "--eval_fraction", "0",
            "--batch_size", "2", "--progress", "false", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    assert "skipped 2 of 6 pairs" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["train_rows"] == 4

    only_long = pairs_file(tmp_path, [long, long])
    assert main([*argv[:4], only_long, *argv[5:], "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err
    assert "every one of the 2 pairs" in err and "--max_prompt_tokens" in err
