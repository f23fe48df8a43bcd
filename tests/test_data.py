import dataclasses
import json
import os

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rto.data import (
    DataError,
    PreferencePair,
    check,
    load_preferences,
    load_prompts,
    read_rows,
    summarize,
    write_jsonl,
)

USER = [{"role": "user", "content": "Hi there"}]
CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Review a cafe."},
    {"role": "assistant", "content": "Nice."},
    {"role": "user", "content": "Again?"},
]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dumps(obj):
    return json.dumps(obj)


def data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- valid files

def test_prompts_jsonl_text_and_messages(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        dumps({"prompt": "Hi there", "extra": 1}),
        "",
        "   ",
        dumps({"prompt": CONVO}),
    ])
    assert load_prompts(path) == [USER, CONVO]


def test_messages_are_normalised_to_role_and_content(tmp_path):
    path = write_lines(tmp_path / "p.json", [dumps({"prompt": [{"role": "user", "content": "x", "name": "a"}]})])
    assert load_prompts(path) == [[{"role": "user", "content": "x"}]]


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + dumps({"prompt": "a"}).encode() + b"\r\n" + dumps({"prompt": "b"}).encode() + b"\r\n")
    assert [p[0]["content"] for p in load_prompts(path)] == ["a", "b"]


def test_where_filters_rows(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        dumps({"prompt": "a", "split": "train"}),
        dumps({"prompt": "b", "split": "eval"}),
    ])
    assert load_prompts(path, where={"split": "eval"}) == [[{"role": "user", "content": "b"}]]


def test_prompts_parquet_and_folder(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "one"}, {"prompt": "two"}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    expected = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    assert load_prompts(tmp_path / "p.parquet") == expected
    assert load_prompts(tmp_path / "folder") == expected


def test_message_prompts_parquet(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": CONVO}, {"prompt": USER}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(tmp_path / "p.parquet") == [CONVO, USER]


def test_dataset_dict_split(tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "tr"}]),
        "test": datasets.Dataset.from_list([{"prompt": "te"}]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd") == [[{"role": "user", "content": "tr"}]]
    assert load_prompts(tmp_path / "dd", split="test") == [[{"role": "user", "content": "te"}]]
    err = data_error(load_prompts, tmp_path / "dd", split="validation")
    assert err.line is None and "validation" in str(err) and "test, train" in str(err)


PREF_ROWS = [
    {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away.", "chosen_ended": True, "rejected_ended": False},
    {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Whatever."},
]
PREF_EXPECTED = [
    PreferencePair([{"role": "user", "content": "Say hi"}], "Hello!", "Go away.", True, False),
    PreferencePair([{"role": "user", "content": "Say bye"}], "Bye!", "Whatever.", True, True),
]


def test_preferences_jsonl(tmp_path):
    path = write_lines(tmp_path / "pref.jsonl", [dumps(r) for r in PREF_ROWS])
    assert load_preferences(path) == PREF_EXPECTED


@pytest.mark.parametrize("form", ["parquet", "folder"])
def test_preferences_parquet_and_folder(tmp_path, form):
    ds = datasets.Dataset.from_list(PREF_ROWS)  # missing ended flags become null -> default True
    if form == "parquet":
        path = tmp_path / "pref.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "pref"
        ds.save_to_disk(str(path))
    assert load_preferences(path) == PREF_EXPECTED


def ultrafeedback_row(q, good, bad):
    return {
        "prompt": q,
        "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }


def test_ultrafeedback_layout_all_formats(tmp_path):
    rows = [ultrafeedback_row("What is 2+2?", "4", "5"), ultrafeedback_row("Capital of France?", "Paris", "Rome")]
    write_lines(tmp_path / "uf.jsonl", [dumps(r) for r in rows])
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf.parquet"))
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "uf"))
    expected = [
        PreferencePair([{"role": "user", "content": "What is 2+2?"}], "4", "5"),
        PreferencePair([{"role": "user", "content": "Capital of France?"}], "Paris", "Rome"),
    ]
    assert load_preferences(tmp_path / "uf.jsonl") == expected
    assert load_preferences(tmp_path / "uf.parquet") == expected
    assert load_preferences(tmp_path / "uf", split="train_prefs") == expected


def test_prompt_defaults_to_messages_before_answer(tmp_path):
    convo = CONVO + [{"role": "assistant", "content": "Good one."}]
    row = {"chosen": convo, "rejected": CONVO + [{"role": "assistant", "content": "Bad one."}]}
    path = write_lines(tmp_path / "p.jsonl", [dumps(row)])
    assert load_preferences(path) == [PreferencePair(CONVO, "Good one.", "Bad one.")]
    # rejected as plain text is fine too
    row = {"chosen": convo, "rejected": "Bad one."}
    path = write_lines(tmp_path / "p.jsonl", [dumps(row)])
    assert load_preferences(path) == [PreferencePair(CONVO, "Good one.", "Bad one.")]


# ---------------------------------------------------------------------------- file-level errors

def test_missing_file(tmp_path):
    err = data_error(load_prompts, tmp_path / "nope.jsonl")
    assert err.line is None
    assert str(err).startswith(str(tmp_path / "nope.jsonl") + ": ")
    assert "does not exist" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    err = data_error(load_preferences, path)
    assert err.line is None and "empty" in str(err) and str(path) in str(err)


def test_empty_parquet_file(tmp_path):
    path = tmp_path / "e.parquet"
    path.write_bytes(b"")
    assert "empty" in str(data_error(load_prompts, path))


def test_zero_row_parquet(tmp_path):
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "z.parquet"))
    assert "no rows" in str(data_error(load_prompts, tmp_path / "z.parquet"))


def test_damaged_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    err = data_error(load_prompts, path)
    assert "Parquet" in str(err) and err.line is None


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "d").mkdir()
    err = data_error(load_prompts, tmp_path / "d")
    assert "save_to_disk" in str(err)


def test_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('\n\n  [{"prompt": "x"},\n {"prompt": "y"}]\n')
    err = data_error(load_prompts, path)
    assert err.line == 3
    assert str(err).startswith(f"{path}:3: ")
    assert "JSON array" in str(err) and "JSON Lines" in str(err)


def test_broken_json_line(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [dumps({"prompt": "ok"}), "", '{"prompt": "unterminated}'])
    err = data_error(load_prompts, path)
    assert err.line == 3
    assert str(err).startswith(f"{path}:3: not valid JSON (Unterminated string")


def test_pretty_printed_object(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{\n  "prompt": "x"\n}\n')
    err = data_error(load_prompts, path)
    assert err.line == 1 and "several lines" in str(err)


def test_non_utf8(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(dumps({"prompt": "ok"}).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    err = data_error(load_prompts, path)
    assert err.line == 2 and "UTF-8" in str(err) and "0xe9" in str(err)


@pytest.mark.parametrize("line, what", [("42", "number"), ('"text"', "string"), ("null", "null"),
                                        ('["a"]', "array")])
def test_line_not_an_object(tmp_path, line, what):
    path = write_lines(tmp_path / "n.jsonl", [dumps({"prompt": "ok"}), line])
    err = data_error(load_prompts, path)
    assert err.line == 2 and f"JSON {what}, not an object" in str(err)


@pytest.mark.parametrize("name", ["p.csv", "p.txt", "p"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("prompt\nhello\n")
    err = data_error(load_prompts, path)
    assert "unsupported file type" in str(err) and ".jsonl" in str(err)


def test_deeply_nested_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [dumps({"prompt": "ok"}), '{"a":' * 100000 + "1" + "}" * 100000])
    assert data_error(load_prompts, path).line == 2


# ---------------------------------------------------------------------------- row-level errors

PROMPT_CASES = [
    ({"text": "hi"}, "field 'prompt' is missing; each line needs \"prompt\" as a string or a list of"),
    ({"prompt": None}, "field 'prompt' is null"),
    ({"prompt": 3}, "field 'prompt' is a number"),
    ({"prompt": "   "}, "field 'prompt' is empty"),
    ({"prompt": []}, "empty list of messages"),
    ({"prompt": ["hi"]}, "message 1 is a string, not an object"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "message 1 has role 'bot'"),
    ({"prompt": [{"role": ["user"], "content": "x"}]}, "message 1 has role a array"),
    ({"prompt": [{"content": "x"}]}, "message 1 has no 'role'"),
    ({"prompt": [{"role": "user"}]}, "message 1 has no 'content'"),
    ({"prompt": [{"role": "user", "content": [{"type": "text"}]}]}, "content of type array"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with a message from 'assistant'"),
    ({"prompt": [{"role": "user", "content": " "}]}, "ends with an empty user message"),
]


@pytest.mark.parametrize("row, expected", PROMPT_CASES)
def test_prompt_row_errors(tmp_path, row, expected):
    path = write_lines(tmp_path / "p.jsonl", [dumps({"prompt": "ok"}), "", dumps(row)])
    err = data_error(load_prompts, path)
    assert err.line == 3
    assert str(err).startswith(f"{path}:3: ")
    assert expected in str(err)


def test_prompt_row_error_in_parquet_names_row(tmp_path):
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": "ok"}, {"prompt": " "}]).to_parquet(str(tmp_path / "p.parquet"))
    err = data_error(load_prompts, tmp_path / "p.parquet")
    assert err.line == 3 and str(err).startswith(f"{tmp_path / 'p.parquet'}: row 3: field 'prompt' is empty")


def test_prompt_column_missing_in_folder(tmp_path):
    datasets.Dataset.from_list([{"text": "ok"}]).save_to_disk(str(tmp_path / "f"))
    err = data_error(load_prompts, tmp_path / "f")
    assert err.line == 1 and "row 1: field 'prompt' is missing; each row needs" in str(err)


GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
PREF_CASES = [
    ({"prompt": "q", "rejected": "b"}, "field 'chosen' is missing"),
    ({"prompt": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"chosen": "a", "rejected": "b"}, "field 'prompt' is missing"),
    ({**GOOD, "chosen": 5}, "field 'chosen' is a number"),
    ({**GOOD, "rejected": ""}, "field 'rejected' is empty"),
    ({**GOOD, "prompt": ""}, "field 'prompt' is empty"),
    ({**GOOD, "rejected": "a"}, "'chosen' and 'rejected' are the same text"),
    ({**GOOD, "chosen": [{"role": "user", "content": "q"}]}, "its last message must be the assistant's answer"),
    ({**GOOD, "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "empty assistant message"),
    ({**GOOD, "chosen": [{"role": "robot", "content": "q"}]}, "has role 'robot'"),
    ({**GOOD, "chosen_ended": "yes"}, "field 'chosen_ended' is a string; it must be true or false"),
    ({**GOOD, "rejected_ended": 0}, "field 'rejected_ended' is a number"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "field 'prompt' is missing"),
    ({"chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
     "do not end with a user message"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "answer different conversations"),
]


@pytest.mark.parametrize("row, expected", PREF_CASES)
def test_preference_row_errors(tmp_path, row, expected):
    path = write_lines(tmp_path / "pref.jsonl", [dumps(GOOD), dumps(GOOD), "", "", dumps(row), dumps(GOOD)])
    err = data_error(load_preferences, path)
    assert err.line == 5
    assert str(err).startswith(f"{path}:5: ")
    assert expected in str(err)
    assert "\n" not in str(err)


def test_error_attributes():
    err = DataError("data/p.jsonl", 17, "field 'prompt' is missing")
    assert isinstance(err, ValueError)
    assert (err.path, err.line, err.message) == ("data/p.jsonl", 17, "field 'prompt' is missing")
    assert str(err) == "data/p.jsonl:17: field 'prompt' is missing"
    assert str(DataError("x.parquet", None, "bad")) == "x.parquet: bad"
    assert str(DataError("x.parquet", 4, "bad", unit="row")) == "x.parquet: row 4: bad"


# ---------------------------------------------------------------------------- write, summarize, check

def test_write_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "héllo ✓", "n": 1}, {"prompt": CONVO}]
    path = write_jsonl(tmp_path / "sub" / "out.jsonl", rows)
    assert [row for _, row, _ in read_rows(path)] == rows
    assert "héllo ✓" in path.read_text(encoding="utf-8")
    assert os.listdir(tmp_path / "sub") == ["out.jsonl"]  # no temp file left behind


def test_write_jsonl_pairs_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PREF_EXPECTED)
    assert load_preferences(path) == PREF_EXPECTED


def test_write_jsonl_failure_keeps_old_file(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_summarize_prompts(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [dumps({"prompt": "abc"}), dumps({"prompt": "abcdefg"}), dumps({"prompt": CONVO})])
    text = summarize(path, "prompts")
    assert "rows: 3" in text and "prompts" in text
    assert "min 3" in text and "max 34" in text  # CONVO: 9 + 14 + 5 + 6 characters
    assert check(path, "prompts") == text


def test_summarize_preferences(tmp_path):
    path = write_lines(tmp_path / "pref.jsonl", [dumps(r) for r in PREF_ROWS])
    text = check(path, "preferences")
    assert "rows: 2" in text
    assert "chosen" in text and "rejected" in text
    assert "not ended: chosen 0, rejected 1" in text
    assert summarize(path, "preferences") == text


def test_unknown_kind(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [dumps({"prompt": "abc"})])
    with pytest.raises(ValueError, match="prompts, preferences"):
        summarize(path, "rewards")
    with pytest.raises(ValueError):
        check(path, "rewards")


def test_check_raises_data_error(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [dumps({"prompt": "abc"}), dumps({"nope": 1})])
    assert data_error(check, path, "prompts").line == 2
    assert data_error(check, path, "preferences").line == 1


# ---------------------------------------------------------------------------- property tests

texts = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}),
    max_size=3,
)
message_prompts = st.builds(lambda head, last: head + [{"role": "user", "content": last}], messages, texts)
prompts = st.one_of(texts, message_prompts)


def as_messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.lists(prompts, min_size=1, max_size=5))
def test_random_prompts_round_trip(tmp_path, values):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": v} for v in values])
    assert load_prompts(path) == [as_messages(v) for v in values]


pref_rows = st.builds(
    lambda prompt, chosen, rejected, ce, re: {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                              "chosen_ended": ce, "rejected_ended": re},
    prompts, texts, texts, st.booleans(), st.booleans(),
).filter(lambda r: r["chosen"] != r["rejected"])


@FAST
@given(st.lists(pref_rows, min_size=1, max_size=5))
def test_random_preferences_round_trip(tmp_path, rows):
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    expected = [PreferencePair(as_messages(r["prompt"]), r["chosen"], r["rejected"], r["chosen_ended"], r["rejected_ended"])
                for r in rows]
    assert load_preferences(path) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "chosen_ended", "x"]), inner, max_size=4),
    max_leaves=12,
)
garbage_line = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    # rows with text that may hold lone surrogates, written as JSON escapes such as \ud800
    st.fixed_dictionaries({"prompt": st.text(st.characters(codec=None), min_size=1, max_size=8),
                           "chosen": st.text(st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=4),
                           "rejected": st.just("r")}).map(lambda v: json.dumps(v).encode()),
)


@FAST
@given(st.lists(garbage_line, max_size=6), st.sampled_from(["g.jsonl", "g.json", "g.parquet", "g.txt"]))
def test_garbage_only_raises_data_error(tmp_path, lines, name):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines))
    for loader in (load_prompts, load_preferences):
        try:
            loaded = loader(path)
        except DataError as err:
            assert str(err).startswith(str(path))
            assert "\n" not in str(err)
            str(err).encode("utf-8")  # printable
        else:  # whatever loads is valid Unicode text
            json.dumps([dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in loaded],
                       ensure_ascii=False).encode("utf-8")


def test_heldout_split_keeps_the_pairs_of_a_prompt_together():
    from rto.stages.common import split_heldout

    items = [(p, j) for p in range(10) for j in range(3)]  # 10 prompts, 3 pairs each
    train, heldout = split_heldout(items, 0.2, seed=0, key=lambda item: item[0])
    assert len(heldout) == 6 and len(train) == 24  # 2 of the 10 prompts, with all their pairs
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    # without a key every item is its own group
    train, heldout = split_heldout(items, 0.2, seed=0)
    assert len(heldout) == 6 and sorted(train + heldout) == items
