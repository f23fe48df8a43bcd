"""Embedded tasks: a prompt set plus a gold scorer that stands in for human judgement.

A task pairs a JSON Lines prompt file (rows with "prompt" and "split" in {"train", "eval"}) with a
factory for its gold scorer. Tasks plug in through ``register_task``; ``get_task(name)`` looks
them up. The sentiment task (VADER gold score) is registered on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from rto.data import load_prompts

SPLITS = ("train", "eval")


@runtime_checkable
class GoldScorer(Protocol):
    """Scores finished response texts; higher is better."""

    name: str

    def __call__(self, texts: list[str]) -> list[float]: ...


@dataclass
class Task:
    name: str
    description: str
    prompts_file: Path
    scorer_factory: Callable[[], GoldScorer]

    def prompts(self, split: str) -> list[list[dict]]:
        """The task's prompts (message lists) whose "split" field equals ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; use one of: "
                             f"{', '.join(SPLITS)}")
        return load_prompts(self.prompts_file, where={"split": split})

    def gold_scorer(self) -> GoldScorer:
        return self.scorer_factory()


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (replacing a task of the same name); returns it."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS)) or "none"
        raise ValueError(f"unknown task {name!r}; available tasks: {known}") from None


from rto.tasks import sentiment as _sentiment  # noqa: E402,F401  (registers "sentiment")
