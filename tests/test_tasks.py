import json
from pathlib import Path

import pytest

from rto.tasks import TASKS, GoldScorer, Task, get_task, register_task
from rto.tasks.sentiment import VaderScorer


@pytest.fixture(scope="module")
def sentiment_rows():
    path = get_task("sentiment").prompts_file
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_sentiment_prompt_counts():
    task = get_task("sentiment")
    train, evals = task.prompts("train"), task.prompts("eval")
    assert len(train) + len(evals) >= 1000
    assert len(evals) >= 128
    for prompt in train + evals:
        assert len(prompt) == 1 and prompt[0]["role"] == "user" and prompt[0]["content"].strip()


def test_sentiment_file_layout(sentiment_rows):
    assert len(sentiment_rows) >= 1100
    assert len({r["prompt"] for r in sentiment_rows}) == len(sentiment_rows)
    for r in sentiment_rows:
        assert set(r) == {"prompt", "topic", "template", "split"}
        assert r["split"] in {"train", "eval"}
        assert r["topic"] in r["prompt"]
        assert "sentence" in r["prompt"]  # every template asks for a short answer


def test_sentiment_split_by_topic(sentiment_rows):
    train = {r["topic"] for r in sentiment_rows if r["split"] == "train"}
    evals = {r["topic"] for r in sentiment_rows if r["split"] == "eval"}
    assert not train & evals
    assert len(evals) >= 14 and len(train) >= 90
    templates = {r["template"] for r in sentiment_rows}
    for topic in evals:  # each eval topic appears with every template
        assert {r["template"] for r in sentiment_rows if r["topic"] == topic} == templates


def test_unknown_split():
    with pytest.raises(ValueError, match="train, eval"):
        get_task("sentiment").prompts("test")


def test_vader_scorer():
    scorer = get_task("sentiment").gold_scorer()
    assert isinstance(scorer, VaderScorer) and isinstance(scorer, GoldScorer)
    assert scorer.name == "vader"
    good, bad, neutral = scorer(["What a wonderful, happy day!", "This is terrible and I hate it.", "The bus."])
    assert good > 0.5 and bad < -0.5
    assert neutral == 0.0  # no lexicon word: VADER's compound is exactly 0
    # one score per text, in order
    assert scorer(["The bus.", "What a wonderful, happy day!"]) == [neutral, good]
    assert scorer([]) == []


def test_get_task_unknown():
    with pytest.raises(ValueError, match="sentiment"):
        get_task("no-such-task")


def test_register_task(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "split": "train"}\n{"prompt": "b", "split": "eval"}\n')

    class Length:
        name = "length"

        def __call__(self, texts):
            return [float(len(t)) for t in texts]

    task = register_task(Task("toy", "toy task", Path(path), Length))
    try:
        assert get_task("toy") is task
        assert task.prompts("eval") == [[{"role": "user", "content": "b"}]]
        assert task.gold_scorer()(["abc"]) == [3.0]
    finally:
        TASKS.pop("toy")
