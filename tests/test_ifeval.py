"""The instruction-following task: its prompt file, its gold scorer (IFEval's checkers, strict) and the rows that
carry each prompt's instructions through the stages."""

import json
from collections import Counter

import pytest

from rto.data import DataError
from rto.tasks import TASKS, Task, get_task, prompts_and_rows, register_task
from rto.tasks import ifeval as ifeval_task
from rto.tasks import make_ifeval_prompts as make
from rto.tasks.ifeval import CheckersMissing, IFEvalScorer, check_row


@pytest.fixture(scope="module")
def scorer():
    try:
        return IFEvalScorer()
    except CheckersMissing as e:  # `make test` installs the extra; a bare `pip install -e .` does not
        pytest.skip(f"the optional extra rto[ifeval] is not installed: {e}")


@pytest.fixture(scope="module")
def file_rows():
    path = get_task("ifeval").prompts_file
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def row(instruction_id, kwargs=None, prompt="Write a note."):
    ids = instruction_id if isinstance(instruction_id, list) else [instruction_id]
    kw = kwargs if isinstance(kwargs, list) else [kwargs or {}]
    return {"prompt": prompt, "split": "eval", "instruction_id_list": ids, "kwargs": kw}


# every kind the prompts use: (kwargs, an answer that follows it, one that does not), written by hand
CASES = {
    make.NO_COMMA: ({}, "Thanks for watering the plants while I was away.", "Thanks, neighbour, for the help."),
    make.WORDS: ({"num_words": 10, "relation": "less than"}, "The bus leaves at eight tomorrow.",
                 "The bus leaves at eight tomorrow morning so please be at the stop early today."),
    make.KEYWORD: ({"keywords": ["today", "soon"]}, "Come by today and see you soon.", "Come by tomorrow."),
    make.FORBIDDEN: ({"forbidden_words": ["garden"]}, "The plants look lovely.", "The Garden looks lovely."),
    make.FREQUENCY: ({"keyword": "garden", "frequency": 2, "relation": "at least"},
                     "The garden is open: come and see the Garden.", "The garden is open."),
    make.TITLE: ({}, "<<Lost cat>>\nHave you seen a grey cat?", "Lost cat: have you seen a grey cat?"),
    make.HIGHLIGHTS: ({"num_highlights": 2}, "Bring *gloves* and *a spade*.", "Bring *gloves* and a spade."),
    make.POSTSCRIPT: ({"postscript_marker": "P.S."}, "See you at noon.\nP.S. Bring snacks.", "See you at noon."),
    make.PLACEHOLDERS: ({"num_placeholders": 2}, "Dear [name], meet me at [place].",
                        "Dear [name], meet me at the park."),
}


def test_every_kind_the_prompts_use_has_a_case(file_rows):
    used = {i for r in file_rows for i in r["instruction_id_list"]}
    assert used == set(CASES) == set(make.KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_kind_passes_and_fails(scorer, kind):
    kwargs, good, bad = CASES[kind]
    assert scorer([good, bad], [row(kind, kwargs)] * 2) == [1.0, 0.0]


def test_more_cases_of_some_kinds(scorer):
    cases = [
        (make.WORDS, {"num_words": 5, "relation": "at least"}, "Please bring the ladder back.", "Hi there."),
        (make.POSTSCRIPT, {"postscript_marker": "P.P.S"}, "Hello.\nP.P.S. One more thing.", "Hello.\nP.S. Hi."),
        (make.WORDS, {"num_words": 3, "relation": "less than"}, "See you.", "See you soon."),  # 3 words is not < 3
        (make.HIGHLIGHTS, {"num_highlights": 1}, "Bring **gloves**.", "Bring * * gloves."),  # empty marks: none
        (make.PLACEHOLDERS, {"num_placeholders": 1}, "Hi [name].", "Hi (name)."),
        (make.FREQUENCY, {"keyword": "cake", "frequency": 3, "relation": "at least"}, "Cake, cake and cake.",
         "Cake and cake."),
        (make.FORBIDDEN, {"forbidden_words": ["rain"]}, "A rainy day.", "Rain again."),  # whole words only
    ]
    for kind, kwargs, good, bad in cases:
        assert scorer([good, bad], [row(kind, kwargs)] * 2) == [1.0, 0.0], kind


def test_score_is_the_share_of_instructions_followed(scorer):
    two = row([make.NO_COMMA, make.KEYWORD], [{}, {"keywords": ["today"]}])
    assert scorer(["See you today.", "See you, today.", "Bye, friend.", ""], [two] * 4) == [1.0, 0.5, 0.0, 0.0]
    assert scorer.check(["See you, today."], [two]) == [[(make.NO_COMMA, False), (make.KEYWORD, True)]]
    assert scorer([], []) == []
    assert scorer.name == "ifeval"


def test_by_kind_lists_every_instruction_in_order(scorer):
    two = row([make.NO_COMMA, make.KEYWORD], [{}, {"keywords": ["today"]}])
    one = row(make.NO_COMMA)
    kinds = scorer.by_kind(["See you, today.", "No commas here", "Bye, friend."], [two, one, two])
    assert kinds == {make.KEYWORD: [True, False], make.NO_COMMA: [False, True, False]}


def test_scores_are_deterministic(scorer, file_rows):
    texts = ["ok thanks see you", "merci beaucoup", "the cat is back home", "LOST CAT FOUND",
             "ja", "hello there friend"] * 2
    for kind in ("change_case:english_lowercase", "change_case:english_capital"):  # langdetect is seeded
        rows = [row(kind)] * len(texts)
        first = scorer(texts, rows)
        assert all(IFEvalScorer()(texts, rows) == first for _ in range(3))
    rows = file_rows[:40]
    texts = [f"answer {i}, with *some* [text]\n* a\n* b" for i in range(len(rows))]
    assert scorer(texts, rows) == IFEvalScorer()(texts, rows)


def test_bad_rows_stop_with_one_line(scorer):
    with pytest.raises(ValueError, match="unknown instruction id 'no:such'"):
        scorer(["hi"], [row("no:such")])
    with pytest.raises(ValueError, match="refuses the kwargs") as e:
        scorer(["hi"], [row(make.PLACEHOLDERS, {"placeholders": 3})])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="2 answers but 1 prompt rows"):
        scorer(["a", "b"], [row(make.NO_COMMA)])
    with pytest.raises(ValueError, match="'kwargs' is missing"):
        scorer(["a"], [{"prompt": "x", "instruction_id_list": [make.NO_COMMA]}])


def test_check_row():
    assert check_row(row(make.NO_COMMA)) is None
    assert check_row({"prompt": "x"}) == "field 'instruction_id_list' is missing"
    assert "non-empty list" in check_row({"instruction_id_list": [], "kwargs": []})
    assert "one object per instruction" in check_row({"instruction_id_list": ["a", "b"], "kwargs": [{}]})
    assert "list of objects" in check_row({"instruction_id_list": ["a"], "kwargs": ["x"]})


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setattr(ifeval_task, "REGISTRY_MODULE", "no_such_checker_module.registry")
    with pytest.raises(CheckersMissing) as e:
        get_task("ifeval").gold_scorer()
    message = str(e.value)
    assert "\n" not in message and "rto[ifeval]" in message and "pip install" in message
    assert isinstance(e.value, ValueError)  # the command line prints it as one line, exit status 2


# --- the prompt file -----------------------------------------------------------------------------------------

def test_prompt_file_counts(file_rows):
    splits = Counter(r["split"] for r in file_rows)
    assert splits == {"train": 1000, "eval": 150}
    task = get_task("ifeval")
    assert len(task.prompts("train")) == 1000 and len(task.prompts("eval")) == 150
    assert len({r["prompt"] for r in file_rows}) == len(file_rows)
    for r in file_rows:
        assert set(r) == {"prompt", "topic", "request", "split", "instruction_id_list", "kwargs"}
        assert r["topic"] in r["prompt"] and len(r["instruction_id_list"]) == 2
        assert len(set(r["instruction_id_list"])) == len(r["instruction_id_list"])
        assert check_row(r) is None
    counts = Counter(i for r in file_rows for i in r["instruction_id_list"])
    assert min(counts.values()) >= 50  # every kind is well represented
    eval_kinds = {i for r in file_rows if r["split"] == "eval" for i in r["instruction_id_list"]}
    assert eval_kinds == set(make.KINDS)


def test_eval_topics_are_unseen_in_train(file_rows):
    train = {r["topic"] for r in file_rows if r["split"] == "train"}
    evals = {r["topic"] for r in file_rows if r["split"] == "eval"}
    assert len(train) == 100 and len(evals) == 15 and not train & evals
    for topic in evals:  # each eval topic comes with every request
        assert {r["request"] for r in file_rows if r["topic"] == topic} == set(make.REQUESTS)


def test_prompt_file_is_regenerated_byte_for_byte(tmp_path):
    out = make.write(tmp_path / "p.jsonl")
    assert out.read_bytes() == get_task("ifeval").prompts_file.read_bytes()
    assert make.make_rows(1) != make.make_rows(2)


def test_no_prompt_pairs_conflicting_kinds(file_rows):
    for r in file_rows:
        ids = r["instruction_id_list"]
        if len(ids) == 2:
            assert (ids[0], ids[1]) not in make.CONFLICTS, r["prompt"]


def test_each_prompt_states_its_constraints(file_rows):
    nouns = dict(make.TRAIN_TOPICS + make.EVAL_TOPICS)
    in_words = {(make.PLACEHOLDERS, 1): ["a placeholder"], (make.HIGHLIGHTS, 1): ["at least one p"]}
    for r in file_rows:
        for kind, kwargs in zip(r["instruction_id_list"], r["kwargs"]):
            values = [v for key, v in kwargs.items() if key != "relation"]
            for v in [w for v in values for w in (v if isinstance(v, list) else [v])]:
                said = [f'"{v}"'] if isinstance(v, str) and kind != make.POSTSCRIPT else [str(v)]
                said += in_words.get((kind, v), [])
                assert any(text in r["prompt"] for text in said), r
            if kind in (make.FORBIDDEN, make.FREQUENCY):  # the topic's own noun: the word the model reaches for
                assert kwargs.get("forbidden_words", [kwargs.get("keyword")]) == [nouns[r["topic"]]]


def test_every_row_is_accepted_by_its_checkers(scorer, file_rows):
    results = scorer.check(["x"] * len(file_rows), file_rows)  # builds every checker with the row's kwargs
    assert [len(r) for r in results] == [len(r["instruction_id_list"]) for r in file_rows]


def test_the_prompts_are_not_trivially_followed(scorer, file_rows):
    scores = scorer(["Sure."] * len(file_rows), file_rows)
    assert 0.1 < sum(scores) / len(scores) < 0.7  # some constraints hold for a bare answer, most do not


# --- rows carried to the scorer --------------------------------------------------------------------------------

def test_rows_follow_their_prompts():
    task = get_task("ifeval")
    for split in ("train", "eval"):
        prompts, rows = task.prompts(split), task.rows(split)
        assert [p[0]["content"] for p in prompts] == [r["prompt"] for r in rows]
    prompts, rows = prompts_and_rows("ifeval", None, "eval", 20, seed=3)
    assert len(prompts) == len(rows) == 20
    assert [p[0]["content"] for p in prompts] == [r["prompt"] for r in rows]


def test_a_prompt_file_must_carry_the_instructions(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(row(make.NO_COMMA)) + "\n" + json.dumps({"prompt": "Say hi."}) + "\n")
    with pytest.raises(DataError) as e:
        prompts_and_rows("ifeval", str(path), "train", None, 0)
    message = str(e.value)
    assert message.startswith(f"{path}:2: field 'instruction_id_list' is missing") and "\n" not in message
    assert "ifeval" in message
    # the sentiment task reads no rows: the same file is fine there
    prompts, rows = prompts_and_rows("sentiment", str(path), "train", None, 0)
    assert len(prompts) == len(rows) == 2
    path.write_text(json.dumps(row(make.NO_COMMA)) + "\n")
    prompts, rows = prompts_and_rows("ifeval", str(path), "train", None, 0)
    assert rows[0]["instruction_id_list"] == [make.NO_COMMA]


class _Recorder:
    """Gold score = the prompt row's "id" plus a small text-length term (so samples of a prompt rarely tie)."""

    name = "recorder"

    def __call__(self, texts, rows):
        return [float(r["id"]) + len(t) / 1000 for t, r in zip(texts, rows)]


@pytest.fixture
def id_task(tmp_path):
    path = tmp_path / "ids.jsonl"
    rows = [{"prompt": f"Say something about number {i}.", "split": split, "id": i} for i, split in
            enumerate(["train", "eval"] * 8)]
    rows.insert(3, {"prompt": "long " * 300, "split": "train", "id": 99})  # skipped by max_prompt_tokens
    rows.insert(5, {"prompt": "long " * 300, "split": "eval", "id": 98})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = register_task(Task("ids", "rows carried", path, _Recorder, check_row=lambda r: None if "id" in r else
                              "field 'id' is missing"))
    yield task, {r["prompt"]: r["id"] for r in rows}
    TASKS.pop("ids")


def test_stages_score_each_answer_with_its_own_row(tmp_path, tiny_model, id_task):
    from rto.stages import eval as eval_stage
    from rto.stages import pairs

    _, id_of = id_task
    pairs.run(pairs.PairsConfig(out=str(tmp_path / "p"), policy=tiny_model, task="ids", num_prompts=None,
                                samples_per_prompt=3, max_new_tokens=6, progress=False, max_prompt_tokens=64))
    made = [json.loads(line) for line in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert made
    for p in made:
        assert int(p["chosen_score"]) == int(p["rejected_score"]) == id_of[p["prompt"][-1]["content"]]
    eval_stage.run(eval_stage.EvalConfig(out=str(tmp_path / "e"), models=[f"sft={tiny_model}"], ref=tiny_model,
                                         task="ids", num_prompts=None, max_new_tokens=4, progress=False,
                                         heatmaps=0, max_prompt_tokens=64))
    samples = [json.loads(line) for line in (tmp_path / "e" / "samples" / "sft.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    assert all(int(s["gold"]) == id_of[s["prompt"]] for s in samples)


def test_eval_and_report_count_each_instruction_kind(tmp_path, tiny_model, scorer, file_rows):
    from rto.stages import eval as eval_stage
    from rto.stages import report

    eval_stage.run(eval_stage.EvalConfig(out=str(tmp_path / "e"), models=[f"sft={tiny_model}", f"b={tiny_model}"],
                                         ref=tiny_model, task="ifeval", num_prompts=6, max_new_tokens=4,
                                         progress=False, heatmaps=0))
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    _, rows = prompts_and_rows("ifeval", None, "eval", 6, 0)
    asked = Counter(i for r in rows for i in r["instruction_id_list"])
    for label in ("sft", "b"):
        assert {k: c["asked"] for k, c in ev["by_kind"][label].items()} == dict(asked)
        # every followed instruction shows in the gold scores: sum over prompts of share * count = followed
        samples = [json.loads(line) for line in (tmp_path / "e" / "samples" / f"{label}.jsonl").read_text().splitlines()]
        followed = sum(round(s["gold"] * len(r["instruction_id_list"])) for s, r in zip(samples, rows))
        assert followed == sum(c["followed"] for c in ev["by_kind"][label].values())
    report.run(report.ReportConfig(out=str(tmp_path / "e"), eval=str(tmp_path / "e")))
    md = (tmp_path / "e" / "report.md").read_text()
    assert "## Per instruction kind" in md and all(f"| {kind} |" in md for kind in asked)


def test_the_ifeval_recipe_is_the_demo_on_this_task():
    from importlib import resources

    import yaml

    from rto.stages.pipeline import stage_configs

    recipes = resources.files("rto.recipes")
    configs = {name: cfg for name, _, cfg in stage_configs(yaml.safe_load(recipes.joinpath("ifeval.yaml").read_text()),
                                                          "ifeval.yaml", {})}
    demo = {name: cfg for name, _, cfg in stage_configs(yaml.safe_load(recipes.joinpath("demo.yaml").read_text()),
                                                        "demo.yaml", {})}
    assert list(configs) == list(demo)
    assert all(configs[n].task == "ifeval" for n in ("pairs", "ppo", "rto", "eval"))
    # every stage that samples answers gives them the budget the prompts are sized for
    assert {configs[n].max_new_tokens for n in ("pairs", "ppo", "rto", "eval")} == {make.ANSWER_TOKENS}
    fields = ("iterations", "rollout_size", "ppo_epochs", "minibatch_size", "actor_lr", "critic_lr", "seed")
    assert [getattr(configs["ppo"], f) for f in fields] == [getattr(configs["rto"], f) for f in fields]  # paired
    assert [getattr(configs["ppo"], f) for f in fields[1:4]] == [getattr(demo["ppo"], f) for f in fields[1:4]]


# --- the baseline benchmark's counting (benchmarks/ifeval_baseline.py) --------------------------------------------

def test_baseline_counts_ties_as_the_pairs_stage_does():
    from benchmarks.ifeval_baseline import prompt_means, tied_prompts

    scores = [0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]
    usable = [True] * 8 + [False, True, True, True]  # the only different sample of prompt 3 is empty: no pair
    assert tied_prompts(scores, usable, 4) == [True, False, True]
    assert tied_prompts([1.0, 0.0], [True, False], 2) == [True]  # fewer than two answers
    assert prompt_means(scores, 4).tolist() == [0.5, 0.5, 0.25]


def test_baseline_counts_each_kind_and_argument():
    from benchmarks.ifeval_baseline import argument_label, follow_counts, markdown_table

    assert argument_label({"num_words": 20, "relation": "less than"}) == "<20"
    assert argument_label({"keyword": "cat", "frequency": 2, "relation": "at least"}) == ">=2"
    assert argument_label({"keywords": ["a", "b"]}) == "2 words"
    assert argument_label({"num_placeholders": 3}) == "num_placeholders=3" and argument_label({}) == ""
    rows = [row([make.NO_COMMA, make.WORDS], [{}, {"num_words": 20, "relation": "less than"}]),
            row([make.WORDS], [{"num_words": 30, "relation": "at least"}])]
    results = [[(make.NO_COMMA, True), (make.WORDS, False)], [(make.WORDS, True)]]
    assert follow_counts(results, rows) == {make.NO_COMMA: {"followed": 1, "asked": 1, "rate": 1.0},
                                            make.WORDS: {"followed": 1, "asked": 2, "rate": 0.5}}
    by_arg = follow_counts(results, rows, by_argument=True)
    assert by_arg[f"{make.WORDS} [<20]"]["rate"] == 0.0 and by_arg[f"{make.WORDS} [>=30]"]["rate"] == 1.0
    assert markdown_table(follow_counts(results, rows)).splitlines()[2:] == [f"| {make.NO_COMMA} | 1.00 | 1 |",
                                                                             f"| {make.WORDS} | 0.50 | 2 |"]
