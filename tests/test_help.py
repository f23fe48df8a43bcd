"""`rto COMMAND --help`: every config field is described (what it does, its unit or the paper's symbol, and
the range rto.config checks), never the dataclass's generated repr."""

from __future__ import annotations

import dataclasses
import re

import pytest

from rto.cli import COMMANDS, main
from rto.config import RULES

POSITIONAL = {"pipeline": {"recipe"}}  # fields given as positional arguments, not --flags


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def entries(text: str) -> dict[str, str]:
    """Each argument of argparse's help layout -> its help text on one line: an argument starts on a line
    indented by two spaces ("  --name NAME  help..."), its help goes on in the lines indented further."""
    found, name = {}, None
    for line in text.splitlines():
        start = re.match(r"^  (\S+)(?: \S+)*?(?: {2,}(\S.*))?$", line)
        if start:
            name = start.group(1).rstrip(",")
            found[name] = start.group(2) or ""
        elif name and re.match(r"^ {3,}\S", line):
            found[name] = f"{found[name]} {line.strip()}".strip()
        else:
            name = None
    return found


def description(help_line: str) -> str:
    """The help text without jsonargparse's "(type: ..., default: ...)" note."""
    cut = max(help_line.rfind("(type:"), help_line.rfind("(required, type:"))
    return (help_line[:cut] if cut >= 0 else help_line).strip()


def range_words(rule_text: str) -> list[str]:
    """What the help must say of a rto.config rule: 'an integer >= 1' -> ['>= 1'], 'a number in [0, 1)' ->
    ['[0, 1)'], 'one of a, b' -> ['a', 'b']; nothing for rules without a bound ('a finite number')."""
    if rule_text.startswith("one of "):
        return rule_text.removeprefix("one of ").split(", ")
    bound = re.search(r"(>=? -?\d+|[\[(]-?\d+, -?\d+[\])])$", rule_text)
    return [bound.group(1)] if bound else []


def described(capsys, command: str) -> dict[str, str]:
    text = help_text(capsys, command)
    assert "Config(" not in text, "the help shows the config dataclass's generated repr"
    found = entries(text)
    config_cls = COMMANDS[command][0]
    out = {}
    for f in dataclasses.fields(config_cls):
        key = f.name if f.name in POSITIONAL.get(command, ()) else f"--{f.name}"
        assert key in found, f"rto {command} --help has no {key}"
        out[f.name] = description(found[key])
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_has_a_description_with_its_range(capsys, command):
    for name, text in described(capsys, command).items():
        assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 3, f"rto {command}: --{name} is not described: {text!r}"
        if name in RULES:
            for word in range_words(RULES[name][1]):
                assert word in text, f"rto {command}: --{name} does not give its range ({RULES[name][1]}): {text!r}"


@pytest.mark.parametrize("command, field, symbol", [
    ("ppo", "beta_dpo", "beta1"), ("ppo", "beta_kl", "beta2"), ("ppo", "beta_rm", "beta3"),
    ("ppo", "lam", "lambda"), ("ppo", "clip", "epsilon"), ("ppo", "gamma", "gamma"), ("ppo", "temperature", "T"),
    ("eval", "beta_dpo", "beta1"), ("dpo", "beta", "beta"), ("dpo", "simpo_gamma", "gamma"),
])
def test_paper_symbols_are_named(capsys, command, field, symbol):
    assert re.search(rf"\b{re.escape(symbol)}\b", described(capsys, command)[field])


def test_help_names_units_and_choices(capsys):
    ppo = described(capsys, "ppo")
    assert "nats per response" in ppo["target_kl"]
    assert "in responses" in ppo["kl_horizon"]
    assert "in tokens" in ppo["max_new_tokens"]
    for choice in ("rto", "sparse", "custom"):
        assert choice in ppo["reward"]
    for choice in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
        assert choice in ppo["loss_agg"]
    for choice in ("tensorboard", "wandb", "mlflow", "trackio", "none"):
        assert choice in ppo["report_to"]
    dpo = described(capsys, "dpo")
    for choice in ("dpo", "ipo", "rdpo", "simpo", "tdpo1", "tdpo2"):
        assert choice in dpo["loss"]
    rm = described(capsys, "rm")
    assert "last" in rm["pooling"] and "mean" in rm["pooling"]


def test_range_words_reads_every_rule():
    assert range_words("an integer >= 1") == [">= 1"]
    assert range_words("a finite number > 0") == ["> 0"]
    assert range_words("a number in (0, 1]") == ["(0, 1]"]
    assert range_words("two numbers in [0, 1)") == ["[0, 1)"]
    assert range_words("one of auto, fp32, bf16") == ["auto", "fp32", "bf16"]
    assert range_words("a finite number") == []
    for _, text in RULES.values():  # every rule is either bounded, a choice, or one of the two unbounded kinds
        assert range_words(text) or text in ("a finite number", "a non-empty folder path"), text
