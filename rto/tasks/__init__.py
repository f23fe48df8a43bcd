"""Embedded tasks: a prompt set plus a gold scorer that stands in for human judgement.

A task pairs a JSON Lines prompt file (rows with "prompt" and "split" in {"train", "eval"}) with a
factory for its gold scorer. A gold scorer is called as ``scorer(texts, rows)``: the response texts and,
for each, the row (dict) of the prompt file it answers. A scorer that judges the text alone may take the
texts only (``Task.gold_scorer`` then wraps it); one that checks per-prompt constraints reads the rows, and
its task's ``check_row`` says which rows it can score (a ``--prompts`` file is checked row by row).
Tasks plug in through ``register_task``; ``get_task(name)`` looks them up. The sentiment task (VADER gold
score) and the instruction-following task "ifeval" are registered on import.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from rto.data import DataError, load_prompts, read_rows

SPLITS = ("train", "eval")


@runtime_checkable
class GoldScorer(Protocol):
    """Scores finished response texts, one score per text; higher is better. ``rows[i]`` is the prompt-file row
    (dict) that ``texts[i]`` answers."""

    name: str

    def __call__(self, texts: list[str], rows: list[Mapping]) -> list[float]: ...


@dataclass
class Task:
    name: str
    description: str
    prompts_file: Path
    scorer_factory: Callable[[], GoldScorer]
    # for a scorer that reads the rows: a row's problem in words (None when the scorer can use the row)
    check_row: Callable[[Mapping], str | None] | None = None

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for task {self.name!r}; use one of: "
                             f"{', '.join(SPLITS)}")
        return {"split": split}

    def prompts(self, split: str) -> list[list[dict]]:
        """The task's prompts (message lists) whose "split" field equals ``split``."""
        return load_prompts(self.prompts_file, where=self._split(split))

    def rows(self, split: str) -> list[dict]:
        """The prompt-file rows of ``split``, in the order of ``prompts(split)``: what the gold scorer reads."""
        return file_rows(self.prompts_file, where=self._split(split), task=self)

    def gold_scorer(self) -> GoldScorer:
        """The task's scorer, called as ``scorer(texts, rows)``; a scorer whose ``__call__`` takes the texts alone
        (the sentiment task's) comes wrapped in a TextScorer that leaves the rows out."""
        scorer = self.scorer_factory()
        return scorer if _takes_rows(scorer) else TextScorer(scorer)


class TextScorer:
    """A gold scorer that judges the text alone, called as ``scorer(texts, rows)``: the rows are not read."""

    def __init__(self, scorer: Callable[[list[str]], list[float]]) -> None:
        self.scorer = scorer
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def __call__(self, texts: list[str], rows: list[Mapping] | None = None) -> list[float]:
        return self.scorer(texts)


def _takes_rows(scorer) -> bool:
    try:
        inspect.signature(scorer).bind([], [])
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume the current contract
        return True
    return True


def file_rows(path: str | Path, where: Mapping | None = None, task: Task | None = None) -> list[dict]:
    """The rows of a prompt file (those whose fields equal ``where``), in the order load_prompts gives their
    prompts. With ``task``, each row is checked by the task's ``check_row``; a row its scorer cannot read
    raises DataError naming the file, the line and what the task needs."""
    rows = []
    for number, row, unit in read_rows(path):
        if where and any(row.get(k) != v for k, v in where.items()):
            continue
        if task is not None and task.check_row is not None and (problem := task.check_row(row)):
            raise DataError(path, number, f"{problem} (task {task.name!r} scores each answer against its prompt's "
                                          f"row; give prompts in the layout of {task.prompts_file.name}, or another "
                                          f"--task)", unit)
        rows.append(dict(row))
    return rows


def prompts_and_rows(task: str, prompts: str | None, split: str, limit: int | None,
                     seed: int) -> tuple[list[list[dict]], list[dict]]:
    """The prompts of a file (validated) or of an embedded task's split, with their rows (for the gold scorer),
    checked against the task's needs; a seeded subset when ``limit`` is set (the prompts
    ``random.Random(seed).sample`` draws)."""
    the_task = get_task(task)
    if prompts:
        messages, rows = load_prompts(prompts), file_rows(prompts, task=the_task)
    else:
        messages, rows = the_task.prompts(split), the_task.rows(split)
    if limit is not None and limit < len(messages):
        picked = random.Random(seed).sample(range(len(messages)), limit)  # the indices sample(messages) takes
        messages, rows = [messages[i] for i in picked], [rows[i] for i in picked]
    return messages, rows


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
from rto.tasks import ifeval as _ifeval  # noqa: E402,F401  (registers "ifeval"; its checkers load when scoring)
