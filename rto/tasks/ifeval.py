"""The embedded instruction-following task: short everyday requests with two verifiable constraints each, scored by
the IFEval checkers.

Each prompt (rto/tasks/ifeval_prompts.jsonl, written by rto/tasks/make_ifeval_prompts.py) carries IFEval's
``instruction_id_list`` and ``kwargs``. The gold score of an answer is the share of its prompt's instructions it
follows, strictly as IFEval defines it (the answer as written, no loosening; an empty answer follows nothing).
The checkers come from the optional extra ``rto[ifeval]``; the language test that some of them use (langdetect)
is seeded, so a score never changes between runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

from rto.tasks import Task, register_task

PROMPTS_FILE = Path(__file__).with_name("ifeval_prompts.jsonl")
REGISTRY_MODULE = "if_verifiable.ifeval.instructions_registry"  # IFEval's checkers, from the extra rto[ifeval]
INSTALL_HINT = "pip install 'rto[ifeval]' (in a clone: pip install -e '.[ifeval]')"


class CheckersMissing(ValueError):
    """The optional IFEval checkers are not installed."""


def load_checkers() -> dict:
    """IFEval's INSTRUCTION_DICT (instruction id -> checker class), with langdetect seeded."""
    try:
        registry = importlib.import_module(REGISTRY_MODULE)
        from langdetect import DetectorFactory
    except ImportError as e:
        raise CheckersMissing(f"task 'ifeval' needs the IFEval checkers of the optional extra 'ifeval' "
                              f"({e.name or e} is not installed): {INSTALL_HINT}") from None
    DetectorFactory.seed = 0  # langdetect samples at random: seeded, every detection is repeatable
    return dict(registry.INSTRUCTION_DICT)


def check_row(row: Mapping) -> str | None:
    """What keeps the scorer from reading ``row`` (None if nothing): IFEval's instruction_id_list and kwargs."""
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if ids is None:
        return "field 'instruction_id_list' is missing"
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        return "field 'instruction_id_list' must be a non-empty list of instruction ids (text)"
    if kwargs is None:
        return "field 'kwargs' is missing"
    if not isinstance(kwargs, list) or not all(k is None or isinstance(k, Mapping) for k in kwargs):
        return "field 'kwargs' must be a list of objects, one per instruction"
    if len(kwargs) != len(ids):
        return f"'kwargs' has {len(kwargs)} entries for {len(ids)} instructions; give one object per instruction"
    return None


class IFEvalScorer:
    """Gold score = share of the prompt's instructions that the answer follows (IFEval, strict), in [0, 1]."""

    name = "ifeval"

    def __init__(self) -> None:
        self._checkers = load_checkers()
        from langdetect.lang_detect_exception import LangDetectException

        self._undetected = LangDetectException

    def _checker(self, instruction_id: str, kwargs: Mapping | None, row: Mapping):
        try:
            checker = self._checkers[instruction_id](instruction_id)
        except KeyError:
            raise ValueError(f"ifeval: unknown instruction id {instruction_id!r} in the prompt "
                             f"{str(row.get('prompt', ''))[:60]!r}; use an id of IFEval's registry, e.g. "
                             f"'punctuation:no_comma'") from None
        args = {k: v for k, v in (kwargs or {}).items() if v is not None}  # IFEval's rows pad with nulls
        try:
            checker.build_description(**args)
            if "prompt" in (checker.get_instruction_args() or {}):
                checker.build_description(prompt=row.get("prompt"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"ifeval: the checker of {instruction_id!r} refuses the kwargs {dict(args)} "
                             f"({' '.join(str(e).split())}); give the arguments of its build_description") from None
        return checker

    def _follows(self, checker, text: str) -> bool:
        if not text.strip():
            return False
        try:
            return bool(checker.check_following(text))
        except self._undetected:  # langdetect finds no language: not English text
            return False

    def check(self, texts: list[str], rows: list[Mapping]) -> list[list[tuple[str, bool]]]:
        """For each answer, (instruction id, followed) for every instruction of its prompt, in the row's order."""
        if len(texts) != len(rows):
            raise ValueError(f"ifeval: {len(texts)} answers but {len(rows)} prompt rows; give one row per answer")
        results = []
        for text, row in zip(texts, rows):
            if problem := check_row(row):
                raise ValueError(f"ifeval: a prompt row cannot be scored: {problem} (prompt "
                                 f"{str(row.get('prompt', ''))[:60]!r})")
            results.append([(i, self._follows(self._checker(i, kw, row), text))
                            for i, kw in zip(row["instruction_id_list"], row["kwargs"])])
        return results

    def __call__(self, texts: list[str], rows: list[Mapping]) -> list[float]:
        return [sum(ok for _, ok in result) / len(result) for result in self.check(texts, rows)]

    def by_kind(self, texts: list[str], rows: list[Mapping]) -> dict[str, list[bool]]:
        """Instruction id -> followed or not, for every instruction of that kind over all the answers (in order)."""
        kinds: dict[str, list[bool]] = {}
        for result in self.check(texts, rows):
            for instruction_id, ok in result:
                kinds.setdefault(instruction_id, []).append(ok)
        return dict(sorted(kinds.items()))


IFEVAL = register_task(Task(
    name="ifeval",
    description="Short everyday requests (reminders, notes, captions, tips...) with two verifiable constraints; "
                "gold score: the share of the prompt's constraints the answer follows (IFEval checkers, strict). "
                "Eval topics are unseen in train. Needs the extra rto[ifeval].",
    prompts_file=PROMPTS_FILE,
    scorer_factory=IFEvalScorer,
    check_row=check_row,
))
