import json
from pathlib import Path

import pytest

from rto.tasks import TASKS, GoldScorer, Task, TextScorer, get_task, prompts_and_rows, register_task
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


def test_vader_scorer(sentiment_rows):
    scorer = get_task("sentiment").gold_scorer()
    # VADER judges the text alone: it comes wrapped so that it is called, like every gold scorer, with the rows
    assert isinstance(scorer, TextScorer) and isinstance(scorer.scorer, VaderScorer) and isinstance(scorer, GoldScorer)
    assert scorer.name == "vader"
    rows = sentiment_rows[:3]
    good, bad, neutral = scorer(["What a wonderful, happy day!", "This is terrible and I hate it.", "The bus."], rows)
    assert good > 0.5 and bad < -0.5
    assert neutral == 0.0  # no lexicon word: VADER's compound is exactly 0
    # one score per text, in order; the rows change nothing
    assert scorer(["The bus.", "What a wonderful, happy day!"], rows[:2]) == [neutral, good]
    assert scorer(["The bus.", "What a wonderful, happy day!"], rows[1::-1]) == [neutral, good]
    assert scorer([], []) == []


def test_rows_come_with_their_prompts(sentiment_rows):
    task = get_task("sentiment")
    for split in ("train", "eval"):
        prompts, rows = task.prompts(split), task.rows(split)
        assert rows == [r for r in sentiment_rows if r["split"] == split]
        assert [p[0]["content"] for p in prompts] == [r["prompt"] for r in rows]


def test_prompts_and_rows_pick_a_seeded_sample_with_its_rows(tmp_path):
    import random

    from rto.data import load_prompts

    every = get_task("sentiment").prompts("eval")
    for limit, seed in ((None, 0), (128, 0), (96, 7), (10_000, 1)):
        prompts, rows = prompts_and_rows("sentiment", None, "eval", limit, seed)
        # the prompts random.Random(seed).sample draws (the eval and demo subsets of earlier versions)
        assert prompts == (every if limit is None or limit >= len(every) else random.Random(seed).sample(every, limit))
        assert [p[0]["content"] for p in prompts] == [r["prompt"] for r in rows]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "extra": i}) + "\n" for i in range(30)))
    prompts, rows = prompts_and_rows("sentiment", str(path), "train", 12, 5)
    assert prompts == random.Random(5).sample(load_prompts(path), 12)
    assert [r["extra"] for r in rows] == [int(p[0]["content"][1:]) for p in prompts]


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
        assert task.rows("eval") == [{"prompt": "b", "split": "eval"}]
        assert task.gold_scorer()(["abc"], task.rows("train")) == [3.0]  # a texts-only scorer is wrapped
    finally:
        TASKS.pop("toy")


def test_a_scorer_that_reads_rows_is_called_with_them(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "split": "train", "want": 2}\n')

    class Want:
        name = "want"

        def __call__(self, texts, rows):
            return [float(len(t) == r["want"]) for t, r in zip(texts, rows)]

    task = register_task(Task("toy2", "toy task", Path(path), Want))
    try:
        scorer = task.gold_scorer()
        assert isinstance(scorer, Want)  # not wrapped
        assert scorer(["ab", "abc"], task.rows("train") * 2) == [1.0, 0.0]
    finally:
        TASKS.pop("toy2")
