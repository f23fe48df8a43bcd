"""Both precision paths train: fp32, and bf16 autocast with fp32 master weights."""

import json

import pytest
import torch

from rto.runtime import resolve_precision
from rto.stages.dpo import DPOConfig, run


def test_auto_precision_is_fp32_or_bf16():
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError):
        resolve_precision("fp16x")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_steps_in_both_precisions(tmp_path, tiny_model, precision):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Describe item {i}.", "chosen": "A lovely, great thing.",
                                         "rejected": "A sad, bad thing.", "chosen_ended": True,
                                         "rejected_ended": i % 2 == 0}) + "\n" for i in range(8)))
    out = tmp_path / precision
    summary = run(DPOConfig(out=str(out), model=tiny_model, pairs=str(pairs), batch_size=4, epochs=1, lr=1e-3,
                            eval_fraction=0.25, precision=precision, train_layers=2, progress=False))
    assert summary["steps"] == 2
    from safetensors.torch import load_file

    weights = load_file(out / "model" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # master weights stay fp32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
