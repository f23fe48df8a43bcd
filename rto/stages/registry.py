"""The one list of stages (used by the `rto` command and by `rto pipeline`) and the typed parsing of their configs.

A stage config is parsed the same way wherever it comes from: the command line, a `--config` file or a
recipe entry go through jsonargparse's type checks (so `lr: 1e-4`, which YAML reads as a string, is a
float, and `beta: abc` is refused), then the dataclass checks every field's range (rto.config).
"""

from __future__ import annotations

import dataclasses
import re

from jsonargparse import ArgumentParser

from rto.config import ConfigError
from rto.stages import dpo, eval as eval_stage, pairs, ppo, report, rm, sft

# name -> (config class, run function, one-line help)
STAGES = {
    "pairs": (pairs.PairsConfig, pairs.run, "sample k responses per prompt and write gold-ranked preference pairs"),
    "sft": (sft.SFTConfig, sft.run, "supervised fine-tuning on the chosen responses of a preference file"),
    "rm": (rm.RMConfig, rm.run, "train a Bradley-Terry reward model"),
    "dpo": (dpo.DPOConfig, dpo.run, "train a DPO model (RTO's dense reward source)"),
    "ppo": (ppo.PPOConfig, ppo.run, "PPO with the RTO token reward (--reward rto) or the sparse RM reward"),
    "eval": (eval_stage.EvalConfig, eval_stage.run, "score models on held-out prompts, every pair compared"),
    "report": (report.ReportConfig, report.run, "write report.md / report.html from eval and PPO runs"),
}


def config_parser(config_cls, skip: set[str] | None = None, **kwargs) -> ArgumentParser:
    """A parser with one typed option per field of `config_cls` (and --config FILE.yaml when asked by the CLI)."""
    parser = ArgumentParser(**kwargs)
    parser.add_class_arguments(config_cls, nested_key=None, skip=skip)
    return parser


def build_config(config_cls, values: dict):
    """The dataclass from parsed values (its __post_init__ checks every field's range)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in names})


def parse_config(stage: str, values: dict, where: str):
    """A stage config from plain values (a recipe entry), typed and range-checked as on the command line.
    Raises ConfigError: "{where}: field 'lr': expected a float, got 'abc'"."""
    config_cls = STAGES[stage][0]
    parser = config_parser(config_cls, exit_on_error=False)
    try:
        namespace = parser.parse_object(values)
    except Exception as e:  # jsonargparse's ArgumentError: the key and the expected type, over several lines
        raise ConfigError(f"{where}: {one_line(str(e))}") from None
    try:
        return build_config(config_cls, vars(namespace))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def one_line(message: str) -> str:
    """jsonargparse's error as one short line: 'field "beta": expected float or null, got 'abc''."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    text = text.replace("Parser key ", "field ").replace("<class '", "").replace("'>", "")
    union = re.search(r'^(field "[^"]+"):.*Subtypes: \[([^\]]*)\].*Given value: (.*)$', text)
    if union:  # an optional field: name the types it takes instead of one error per type
        types = " or ".join(t.strip().replace("NoneType", "null") for t in union.group(2).split(","))
        text = f"{union.group(1)}: expected {types}, got {union.group(3)!r}"
    return text if len(text) <= 300 else text[:297] + "..."
