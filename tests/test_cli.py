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


GOOD_PROMPT = b'{"prompt": "Write a review of tea."}\n'
GOOD_PAIR = b'{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}\n'
# name -> (file content, line named in the message or None for the whole file, words the message must contain)
HOSTILE = {
    "broken JSON": (b'{"prompt": "Hi", "chosen": "A", \n', 2, "not valid JSON"),
    "wrong type": (b'{"prompt": 42, "chosen": "A", "rejected": "B"}\n', 2, "field 'prompt' is a number"),
    "missing field": (b'{"question": "Hi?"}\n', 2, "field 'prompt' is missing"),
    "empty prompt": (b'{"prompt": "  ", "chosen": "A", "rejected": "B"}\n', 2, "field 'prompt' is empty"),
    "null prompt": (b'{"prompt": null, "chosen": "A", "rejected": "B"}\n', 2, "field 'prompt' is null"),
    "unknown role": (b'{"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "A", "rejected": "B"}\n', 2,
                     "role 'robot'"),
    "non-UTF-8": (b'{"prompt": "caf\xe9", "chosen": "A", "rejected": "B"}\n', 2, "not valid UTF-8"),
    "JSON array": (b'[{"prompt": "Hi", "chosen": "A", "rejected": "B"}]\n', 1, "JSON array"),
    "empty file": (b"", None, "file is empty"),
}
PAIRS_ONLY = {"chosen equals rejected": (b'{"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}\n', 2,
                                         "the same text")}


def _hostile_file(tmp_path, name: str, kind: str) -> tuple[str, int | None, str]:
    content, line, words = {**HOSTILE, **PAIRS_ONLY}[name]
    good = GOOD_PROMPT if kind == "prompts" else GOOD_PAIR
    if name == "missing field" and kind == "preferences":
        content, words = b'{"prompt": "Hi?", "rejected": "No."}\n', "field 'chosen' is missing"
    path = tmp_path / f"{kind}.jsonl"
    path.write_bytes(content if line in (None, 1) else good + content)
    return str(path), line, words


def _clear_error(capsys, argv, path, line, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (f"{path}:{line}:" if line else f"{path}:") in err and words in err, err


CASES = [(name, "prompts") for name in HOSTILE] + [(name, "preferences") for name in {**HOSTILE, **PAIRS_ONLY}]


@pytest.mark.parametrize("name, kind", CASES)
def test_data_check_explains_every_hostile_input(capsys, tmp_path, name, kind):
    path, line, words = _hostile_file(tmp_path, name, kind)
    _clear_error(capsys, ["data", "check", path, "--kind", kind], path, line, words)


@pytest.mark.parametrize("name, kind", CASES)
def test_every_stage_explains_every_hostile_input(capsys, tmp_path, tiny_model, name, kind):
    path, line, words = _hostile_file(tmp_path, name, kind)
    stages = {"prompts": [("pairs", "--prompts"), ("ppo", "--prompts"), ("eval", "--prompts")],
              "preferences": [("sft", "--data"), ("rm", "--pairs"), ("dpo", "--pairs")]}[kind]
    for stage, flag in stages:
        argv = [stage, flag, path, "--out", str(tmp_path / stage), "--progress", "false"]
        argv += {"ppo": ["--reward", "sparse", "--policy", tiny_model, "--reward_model", tiny_model],
                 "pairs": ["--policy", tiny_model], "eval": ["--ref", tiny_model, "--models", f"[{tiny_model}]"]
                 }.get(stage, ["--model", tiny_model])
        _clear_error(capsys, argv, path, line, words)


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
