"""Models rto cannot train are refused in one line naming the role and the path, before any weights load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rto.cli import main
from rto.models import ModelLoadError, ValueModel, load_causal_lm


@pytest.fixture
def gemma3_image_text(tmp_path, tiny_model):
    """A config-only Gemma3ForConditionalGeneration folder (no hidden_size on its top config), with a tokenizer."""
    from transformers import Gemma3Config

    folder = tmp_path / "gemma3-vision"
    config = Gemma3Config(architectures=["Gemma3ForConditionalGeneration"])
    assert not hasattr(config, "hidden_size")
    config.save_pretrained(folder)
    for f in Path(tiny_model).iterdir():  # the tokenizer files, chat template included
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    return str(folder)


@pytest.mark.parametrize("load", [load_causal_lm, ValueModel.from_pretrained])
def test_an_image_text_checkpoint_is_refused_naming_role_and_path(gemma3_image_text, load):
    with pytest.raises(ModelLoadError) as e:
        load(gemma3_image_text, role="reward model")
    message = str(e.value)
    assert e.value.reason == "not_causal_lm" and "\n" not in message
    assert "the reward model" in message and gemma3_image_text in message
    assert "Gemma3ForConditionalGeneration" in message and "image-text" in message and "gemma3_text" in message


def test_a_stage_stops_with_one_line_for_an_image_text_model_and_a_missing_path(capsys, tmp_path, gemma3_image_text):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}\n')
    for model, expected in ((gemma3_image_text, "image-text"), (str(tmp_path / "no" / "such"), "no such folder")):
        assert main(["rm", "--model", model, "--pairs", str(pairs), "--out", str(tmp_path / "rm"),
                     "--progress", "false"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "the model" in err and model in err and expected in err
