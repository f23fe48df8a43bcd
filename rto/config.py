"""The allowed range of every config field, checked when a config is built.

Stage configs are dataclasses; building one (from the command line, a `--config` file, a recipe or
Python) runs `check_fields`, so a bad value stops the stage in one line before any model loads:

    lr must be a finite number > 0, got -1.0

A field is checked by its name: the same name means the same rule in every stage.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable

from rto.advantages import ADVANTAGE_ESTIMATORS
from rto.rewards import GRANULARITIES


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range."""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low), f"an integer >= {low}"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda x: _number(x) and x > 0), "a finite number > 0"


def _non_negative() -> tuple[Callable[[Any], bool], str]:
    return (lambda x: _number(x) and x >= 0), "a finite number >= 0"


def _within(low: float, high: float, high_open: bool = False, low_open: bool = False):
    text = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return (lambda x: _number(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)), text


def _one_of(*choices: str):
    return (lambda x: x in choices), "one of " + ", ".join(choices)


# field name -> (test, what it must be); a field whose value is None is not checked when its default allows None
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: _int_at_least(1) for name in (
        "batch_size", "epochs", "iterations", "rollout_size", "minibatch_size", "ppo_epochs", "num_prompts",
        "max_new_tokens", "max_prompt_tokens", "max_response_tokens", "generation_batch_size", "score_batch_size",
        "train_layers", "keep_checkpoints", "threads", "kl_horizon", "micro_batch_size")},
    **{name: _int_at_least(0) for name in ("checkpoint_every", "max_nonfinite_steps", "heatmaps", "top_k", "seed")},
    "samples_per_prompt": _int_at_least(2),
    **{name: _positive() for name in (
        "lr", "actor_lr", "critic_lr", "head_lr", "max_grad_norm", "clip", "value_clip", "dpo_clip", "rm_clip",
        "temperature", "target_kl", "beta")},
    **{name: _non_negative() for name in ("beta_dpo", "beta_kl", "beta_rm", "weight_decay")},
    "missing_eos_penalty": ((lambda x: _number(x)), "a finite number"),
    "alpha": _non_negative(),  # dpo: R-DPO length weight, TDPO2 sequential-KL weight
    "simpo_gamma": ((lambda x: _number(x)), "a finite number"),  # dpo: SimPO target margin
    "eval_fraction": _within(0, 1, high_open=True),
    "warmup_ratio": _within(0, 1, high_open=True),
    "min_lr_ratio": _within(0, 1),
    "top_p": _within(0, 1, low_open=True),
    "gamma": _within(0, 1),
    "lam": _within(0, 1),
    "betas": ((lambda x: len(x) == 2 and all(_number(b) and 0 <= b < 1 for b in x)), "two numbers in [0, 1)"),
    "precision": _one_of("auto", "fp32", "bf16"),
    "estimator": _one_of(*ADVANTAGE_ESTIMATORS),  # ppo: advantage estimator
    "granularity": _one_of(*GRANULARITIES),  # ppo: where the DPO term is paid
    "group_size": _int_at_least(1),  # ppo: responses per prompt
    "out": ((lambda x: isinstance(x, str) and x.strip() != ""), "a non-empty folder path"),
}


def check_fields(cfg) -> None:
    """Raise ConfigError naming the first field of the dataclass `cfg` whose value breaks its rule (RULES)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in RULES or value is None:
            continue
        test, text = RULES[f.name]
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f"{f.name} must be {text}, got {value!r}")
