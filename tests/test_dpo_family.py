"""`rto dpo --loss NAME` end to end on a tiny model: every loss of the DPO family trains, and the saved model
records the loss, its hyperparameters and its reference (none for SimPO)."""

import json
import math

import pytest
import torch

from rto.config import ConfigError
from rto.losses import PREFERENCE_LOSSES
from rto.stages import dpo
from rto.stages.dpo import DPOConfig, run


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{folder}/model.safetensors")


@pytest.mark.parametrize("name", list(PREFERENCE_LOSSES))
def test_each_loss_trains_and_is_recorded(tmp_path, tiny_model, pairs_file, monkeypatch, name):
    loaded = []
    real_load = dpo.load_causal_lm
    monkeypatch.setattr(dpo, "load_causal_lm",
                        lambda *a, role, **k: loaded.append(role) or real_load(*a, role=role, **k))
    kl_calls = []
    real_kl = dpo.sequential_kl
    monkeypatch.setattr(dpo, "sequential_kl", lambda *a: kl_calls.append(1) or real_kl(*a))

    out = tmp_path / name
    summary = run(DPOConfig(out=str(out), model=tiny_model, pairs=pairs_file, loss=name, batch_size=2, lr=1e-2,
                            warmup_ratio=0.0, eval_fraction=0.2, train_layers=2, progress=False, precision="fp32"))
    assert summary["steps"] == 3  # 5 training pairs (1 held out), batches of 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert all(math.isfinite(v) for k, v in summary.items() if k.startswith("heldout_"))
    assert "heldout_accuracy" in summary and "heldout_reward_margin" in summary

    # the model changed
    before, after = _weights(tiny_model), _weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # the record says how it was trained
    record = json.loads((out / "model" / "rto_model.json").read_text())
    hyper = PREFERENCE_LOSSES[name].hyperparameters()
    assert record["loss"] == name and record["beta"] == hyper["beta"]
    assert record["alpha"] == hyper.get("alpha") and record["gamma"] == hyper.get("gamma")

    # only what the loss needs was computed: no reference for SimPO, full-vocabulary KL only for TDPO
    if name == "simpo":
        assert loaded == ["policy"]
        assert record["reference"] is None and "reference_fingerprint" not in record
    else:
        assert loaded == ["policy", "reference"]
        assert record["reference"] == tiny_model and record["reference_fingerprint"]
    assert bool(kl_calls) == name.startswith("tdpo")
    if name.startswith("tdpo"):
        assert all(r["train/seq_kl_rejected"] >= 0 for r in rows)


def test_given_hyperparameters_are_used_and_recorded(tmp_path, tiny_model, pairs_file):
    out = tmp_path / "simpo"
    run(DPOConfig(out=str(out), model=tiny_model, pairs=pairs_file, loss="simpo", beta=2.0, simpo_gamma=1.4,
                  batch_size=3, eval_fraction=0.0, train_layers=1, progress=False, precision="fp32"))
    record = json.loads((out / "model" / "rto_model.json").read_text())
    assert (record["beta"], record["alpha"], record["gamma"]) == (2.0, None, 1.4)


@pytest.mark.parametrize("fields, message", [
    ({"loss": "kto"}, "loss must be one of dpo, ipo, rdpo, simpo, tdpo1, tdpo2, got 'kto'"),
    ({"loss": "dpo", "alpha": 0.1}, "the dpo loss takes no alpha (its hyperparameters: beta)"),
    ({"loss": "rdpo", "simpo_gamma": 0.5}, "the rdpo loss takes no simpo_gamma (its hyperparameters: beta, alpha)"),
    ({"loss": "tdpo1", "alpha": 0.2}, "the tdpo1 loss takes no alpha"),
    ({"loss": "simpo", "ref": "some/model"}, "the simpo loss is reference-free"),
    ({"loss": "rdpo", "alpha": -0.001}, "alpha must be a finite number >= 0"),
    ({"loss": "simpo", "simpo_gamma": float("inf")}, "simpo_gamma must be a finite number"),
    ({"loss": "simpo", "beta": 0.0}, "beta must be a finite number > 0"),
])
def test_bad_loss_settings_are_refused_when_the_config_is_built(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DPOConfig(out=str(tmp_path / "o"), **fields)
