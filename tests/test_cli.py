"""The command line: data validation, and the one-line error of every stage that reads a broken file."""

import subprocess
import sys

import pytest

from rto.cli import main

BAD_PROMPTS = '{"prompt": "Write a review of tea."}\n{"prompt": ""}\n'
BAD_PAIRS = ('{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}\n'
             '{"prompt": "Say hi.", "chosen": "Hi!"}\n')


@pytest.fixture
def bad_files(tmp_path):
    prompts, pairs = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    prompts.write_text(BAD_PROMPTS)
    pairs.write_text(BAD_PAIRS)
    return str(prompts), str(pairs)


def _one_line_error(capsys, argv, path, line):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path}:{line}:" in err and "Traceback" not in err
    return err


def test_data_check_good_file(capsys):
    from rto.tasks.sentiment import PROMPTS_FILE

    assert main(["data", "check", str(PROMPTS_FILE), "--kind", "prompts"]) == 0
    out = capsys.readouterr().out
    assert "rows: 1170" in out and "prompt" in out


def test_data_check_bad_files(capsys, bad_files):
    prompts, pairs = bad_files
    _one_line_error(capsys, ["data", "check", prompts, "--kind", "prompts"], prompts, 2)
    err = _one_line_error(capsys, ["data", "check", pairs, "--kind", "preferences"], pairs, 2)
    assert "rejected" in err


@pytest.mark.parametrize("stage, flag, which", [
    ("pairs", "--prompts", 0), ("ppo", "--prompts", 0), ("eval", "--prompts", 0),
    ("rm", "--pairs", 1), ("dpo", "--pairs", 1), ("sft", "--data", 1),
])
def test_every_stage_reports_broken_data_in_one_line(capsys, tmp_path, bad_files, tiny_model, stage, flag, which):
    path = bad_files[which]
    argv = [stage, flag, path, "--out", str(tmp_path / stage), "--progress", "false"]
    if stage == "ppo":
        argv += ["--reward", "sparse", "--policy", tiny_model, "--reward_model", tiny_model]
    _one_line_error(capsys, argv, path, 2)


def test_rto_reward_without_dpo_model_is_a_clear_error(capsys, tmp_path):
    assert main(["ppo", "--reward", "rto", "--out", str(tmp_path / "p")]) == 2
    assert "--dpo_model" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(bad_files):
    prompts, _ = bad_files
    proc = subprocess.run([sys.executable, "-m", "rto.cli", "data", "check", prompts, "--kind", "prompts"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and f"{prompts}:2:" in proc.stderr


def test_recipe_with_an_unknown_field_names_the_stage(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("out: x\nstages:\n  - {stage: rm, epochz: 2}\n")
    assert main(["pipeline", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "epochz" in err
