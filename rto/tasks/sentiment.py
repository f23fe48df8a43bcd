"""The embedded sentiment task: short everyday texts, scored by VADER's compound sentiment."""

from __future__ import annotations

from pathlib import Path

from rto.tasks import Task, register_task

PROMPTS_FILE = Path(__file__).with_name("sentiment_prompts.jsonl")


class VaderScorer:
    """Gold score = VADER ``compound`` polarity in [-1, 1] (more positive is better)."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()  # loads the lexicon once

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]


SENTIMENT = register_task(Task(
    name="sentiment",
    description="Write short reviews, stories, notes and posts about everyday topics; "
                "gold score: VADER compound sentiment (-1 to 1). Eval topics are unseen in train.",
    prompts_file=PROMPTS_FILE,
    scorer_factory=VaderScorer,
))
