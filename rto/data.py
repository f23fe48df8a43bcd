"""Prompt and preference datasets: loading, validation, atomic writing, summaries.

Three on-disk formats are accepted, for both kinds of data:
  * JSON Lines (``.jsonl`` or ``.json``): one JSON object per line, blank lines skipped.
    Errors name the 1-based physical line: ``data/p.jsonl:17: ...``.
  * Parquet (``.parquet``). Errors name the 1-based row: ``data/p.parquet: row 17: ...``.
  * A folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``;
    the ``split`` argument picks the split). Errors name the 1-based row, as for Parquet.

A message list is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``. Loaded
messages are normalised to exactly these two keys; other keys are dropped.

Every problem is reported as a ``DataError`` (a ``ValueError``) that says where, what is wrong,
and what to do about it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
KINDS = ("prompts", "preferences")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

_PROMPT_HELP = 'needs "prompt" as a string or a list of {"role", "content"} messages'
_MESSAGES_HELP = (
    'write messages as a list of {"role": "system"|"user"|"assistant", "content": "<text>"} objects'
)


class DataError(ValueError):
    """A problem in a data file, located by path and (when known) line or row number.

    ``str(err)`` is one line: ``"{path}:{line}: {message}"`` for JSON Lines,
    ``"{path}: row {line}: {message}"`` for Parquet and ``save_to_disk`` folders, and
    ``"{path}: {message}"`` when the problem concerns the whole file.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, unit: str = "line"):
        self.path = str(path)
        self.line = line
        self.message = message
        self.unit = unit  # "line" (JSON Lines) or "row" (Parquet, datasets folders)
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        if self.unit == "row":
            return f"{self.path}: row {self.line}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class _RowError(Exception):
    """Raised by the row validators; the caller adds path and line."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference comparison: for ``prompt``, ``chosen`` is preferred to ``rejected``.

    ``chosen_ended`` / ``rejected_ended`` say whether the response ended naturally (the trainer
    appends the EOS token) or was cut at the length limit (no EOS appended).
    """

    prompt: list[dict]
    chosen: str
    rejected: str
    chosen_ended: bool = True
    rejected_ended: bool = True


# ----------------------------------------------------------------------------------------------
# Reading raw rows
# ----------------------------------------------------------------------------------------------

def _format_of(path: Path) -> str:
    if not path.exists():
        raise DataError(path, None, "file does not exist; check the path (relative paths are "
                                    "read from the current working directory)")
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        fmt = "jsonl"
    elif suffix in PARQUET_SUFFIXES:
        fmt = "parquet"
    else:
        shown = f"'{path.suffix}'" if path.suffix else "no extension"
        raise DataError(path, None, f"unsupported file type ({shown}); use JSON Lines (.jsonl or "
                                    ".json), Parquet (.parquet) or a folder written by "
                                    "datasets' save_to_disk")
    if path.stat().st_size == 0:
        raise DataError(path, None, "file is empty; it needs one row per example "
                                    "(for JSON Lines: one JSON object per line)")
    return fmt


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    data = path.read_bytes()
    seen_content = False
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, number, f"bytes that are not valid UTF-8 (byte 0x{e.object[e.start]:02x} "
                                          f"at byte {e.start + 1} of the line); save the file as UTF-8") from None
        stripped = text.strip()
        if not stripped:
            continue
        if not seen_content and stripped.startswith("["):
            raise DataError(path, number, "this looks like a JSON array; write one JSON object "
                                          "per line (JSON Lines) instead of a single array")
        seen_content = True
        try:
            value = json.loads(stripped)
        except RecursionError:
            raise DataError(path, number, "JSON nested too deeply to read; each line must be "
                                          "one flat JSON object") from None
        except json.JSONDecodeError as e:
            raise DataError(path, number, f"not valid JSON ({e.msg} at column {e.colno}); each "
                                          "line must be one complete JSON object (JSON Lines), "
                                          "so a pretty-printed object spread over several lines "
                                          "does not work") from None
        except ValueError as e:  # e.g. an integer literal with too many digits
            raise DataError(path, number, f"not valid JSON ({e}); each line must be one complete "
                                          "JSON object (JSON Lines)") from None
        if not isinstance(value, dict):
            raise DataError(path, number, f"this line is a JSON {_json_type(value)}, not an object; "
                                          'each line must be one JSON object such as '
                                          '{"prompt": "..."}')
        yield number, value
    if not seen_content:
        raise DataError(path, None, "file is empty (only blank lines); it needs one JSON object "
                                    "per line")


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(path, None, f"could not be read as Parquet ({_one_line(e)}); check that "
                                    "the file is a complete Parquet file, or use JSON Lines") from None
    return table.to_pylist()


def _datasets_rows(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(path, None, f"this folder could not be loaded as a dataset ({_one_line(e)}); "
                                    "pass a folder written by datasets' save_to_disk, or a "
                                    ".jsonl/.parquet file") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            names = ", ".join(sorted(loaded)) or "none"
            raise DataError(path, None, f"the dataset has no split '{split}' (available: {names}); "
                                        "choose one of those splits")
        loaded = loaded[split]
    return loaded.to_list()


def read_rows(path: str | os.PathLike, split: str = "train") -> Iterator[tuple[int, dict, str]]:
    """Yield ``(number, row, unit)`` for every row of a data file, with no field validation.

    ``number`` is the 1-based physical line (``unit == "line"``, JSON Lines) or the 1-based row
    (``unit == "row"``, Parquet and ``save_to_disk`` folders). File-level problems raise DataError.
    """
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "jsonl":
        for number, row in _jsonl_rows(path):
            yield number, row, "line"
        return
    rows = _parquet_rows(path) if fmt == "parquet" else _datasets_rows(path, split)
    if not rows:
        raise DataError(path, None, "the dataset has no rows; it needs at least one example")
    for number, row in enumerate(rows, start=1):
        yield number, row, "row"


# ----------------------------------------------------------------------------------------------
# Validating fields
# ----------------------------------------------------------------------------------------------

def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _require(row: Mapping, field: str, help_text: str) -> Any:
    if field not in row:
        raise _RowError(f"field '{field}' is missing; {help_text}")
    value = row[field]
    if value is None:
        raise _RowError(f"field '{field}' is null; {help_text}")
    return value


def _messages(value: Any, field: str) -> list[dict]:
    """Validate a message list and return it normalised to {"role", "content"} dicts."""
    if len(value) == 0:
        raise _RowError(f"field '{field}' is an empty list of messages; give at least one message "
                        f"or plain text")
    out = []
    for i, message in enumerate(value, start=1):
        where = f"field '{field}', message {i}"
        if not isinstance(message, dict):
            raise _RowError(f"{where} is a {_json_type(message)}, not an object; {_MESSAGES_HELP}")
        role = message.get("role")
        if role is None:
            raise _RowError(f"{where} has no 'role'; {_MESSAGES_HELP}")
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if isinstance(role, str) else f"a {_json_type(role)}"
            raise _RowError(f"{where} has role {shown}; the role must be one of "
                            f"{', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            raise _RowError(f"{where} has no 'content'; {_MESSAGES_HELP}")
        if not isinstance(content, str):
            raise _RowError(f"{where} has content of type {_json_type(content)}; the content "
                            "must be a string (multi-part content is not supported)")
        out.append({"role": role, "content": content})
    return out


def _text(value: str, field: str) -> str:
    if not value.strip():
        raise _RowError(f"field '{field}' is empty; give non-empty text")
    return value


def _prompt(value: Any, field: str = "prompt", noun: str = "each line") -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, field)}]
    if isinstance(value, (list, tuple)):
        messages = _messages(value, field)
        if messages[-1]["role"] != "user":
            raise _RowError(f"field '{field}' ends with a message from '{messages[-1]['role']}'; a prompt "
                            "must end with a 'user' message (the model answers it)")
        if not messages[-1]["content"].strip():
            raise _RowError(f"field '{field}' ends with an empty user message; give the user's text")
        return messages
    raise _RowError(f"field '{field}' is a {_json_type(value)}; {noun} {_PROMPT_HELP}")


def _response(value: Any, field: str) -> tuple[str, list[dict] | None]:
    """Return (response text, conversation before it or None when given as plain text)."""
    if isinstance(value, str):
        return _text(value, field), None
    if isinstance(value, (list, tuple)):
        messages = _messages(value, field)
        last = messages[-1]
        if last["role"] != "assistant":
            raise _RowError(f"field '{field}' ends with a message from '{last['role']}'; its last message "
                            "must be the assistant's answer (UltraFeedback layout: "
                            '[{"role": "user", ...}, {"role": "assistant", "content": answer}])')
        if not last["content"].strip():
            raise _RowError(f"field '{field}' ends with an empty assistant message; give the answer text")
        return last["content"], messages[:-1]
    raise _RowError(f"field '{field}' is a {_json_type(value)}; give the response as a string or as "
                    "a list of messages ending with the assistant's answer")


def _ended(row: Mapping, field: str) -> bool:
    value = row.get(field)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise _RowError(f"field '{field}' is a {_json_type(value)}; it must be true or false "
                        "(or left out, meaning true)")
    return value


def _preference(row: Mapping, noun: str) -> PreferencePair:
    pair_help = ('needs "chosen" and "rejected", each as a string or a list of messages ending with '
                 "the assistant's answer")
    chosen, chosen_context = _response(_require(row, "chosen", f"{noun} {pair_help}"), "chosen")
    rejected, rejected_context = _response(_require(row, "rejected", f"{noun} {pair_help}"), "rejected")
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt", noun)
    elif chosen_context:
        try:
            prompt = _prompt(chosen_context, "chosen")
        except _RowError:
            raise _RowError("field 'prompt' is missing and the messages before the answer in "
                            "'chosen' do not end with a user message; add \"prompt\" or put the "
                            "user's message just before the assistant's answer") from None
        if rejected_context and rejected_context != prompt:
            raise _RowError("field 'prompt' is missing and 'chosen' and 'rejected' answer different "
                            "conversations; give both the same messages before the answer, or add "
                            '"prompt"')
    else:
        state = "null" if "prompt" in row else "missing"
        raise _RowError(f"field 'prompt' is {state}; {noun} {_PROMPT_HELP} (it may be left out "
                        "only when 'chosen' is a message list that contains the prompt)")
    if chosen == rejected:
        raise _RowError("'chosen' and 'rejected' are the same text; a preference pair needs two "
                        "different responses (drop this row)")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                          chosen_ended=_ended(row, "chosen_ended"),
                          rejected_ended=_ended(row, "rejected_ended"))


def _rows_matching(path, split, where):
    for number, row, unit in read_rows(path, split):
        if where and any(row.get(k) != v for k, v in where.items()):
            continue
        yield number, row, unit


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------

def load_prompts(path: str | os.PathLike, split: str = "train",
                 where: Mapping[str, Any] | None = None) -> list[list[dict]]:
    """Load prompts as message lists; a text prompt becomes ``[{"role": "user", "content": text}]``.

    Each row needs ``prompt``: non-empty text, or a message list ending with a user message.
    Extra fields are ignored. ``split`` picks the split of a ``DatasetDict`` folder; ``where``
    keeps only rows whose fields equal the given values (e.g. ``{"split": "eval"}``).
    """
    prompts = []
    for number, row, unit in _rows_matching(path, split, where):
        noun = f"each {unit}"
        try:
            prompts.append(_prompt(_require(row, "prompt", f"{noun} {_PROMPT_HELP}"), "prompt", noun))
        except _RowError as e:
            raise DataError(path, number, str(e), unit) from None
    return prompts


def load_preferences(path: str | os.PathLike, split: str = "train",
                     where: Mapping[str, Any] | None = None) -> list[PreferencePair]:
    """Load preference pairs.

    Each row has ``chosen`` and ``rejected`` (text, or a message list whose last message is the
    assistant's answer, as in UltraFeedback-binarized) and ``prompt`` (text or a message list;
    optional when ``chosen`` is a message list, whose messages before the answer are then the
    prompt). Optional booleans ``chosen_ended`` / ``rejected_ended`` default to true.
    """
    pairs = []
    for number, row, unit in _rows_matching(path, split, where):
        try:
            pairs.append(_preference(row, f"each {unit}"))
        except _RowError as e:
            raise DataError(path, number, str(e), unit) from None
    return pairs


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping | PreferencePair]) -> Path:
    """Write rows as JSON Lines atomically (temp file in the same folder, then ``os.replace``).

    Dataclass rows (e.g. PreferencePair) are written as their fields. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                if dataclasses.is_dataclass(row) and not isinstance(row, type):
                    row = dataclasses.asdict(row)
                line = json.dumps(row, ensure_ascii=False)
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates: fall back to \\u escapes
                    line = json.dumps(row)
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Summaries for `rto data check`
# ----------------------------------------------------------------------------------------------

def _prompt_chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def _stats(name: str, lengths: list[int]) -> str:
    mean = sum(lengths) / len(lengths)
    return f"  {name:<9} min {min(lengths):,} / mean {mean:,.1f} / max {max(lengths):,}"


def _format_name(path: Path) -> str:
    if path.is_dir():
        return "datasets folder"
    return "Parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "JSON Lines"


def _summary(path: Path, kind: str, items: list) -> str:
    lines = [f"{path}: {kind} ({_format_name(path)})", f"rows: {len(items)}"]
    if not items:
        return "\n".join(lines)
    lines.append("length in characters:")
    if kind == "prompts":
        lines.append(_stats("prompt", [_prompt_chars(p) for p in items]))
        multi = sum(len(p) > 1 for p in items)
        lines.append(f"multi-message prompts: {multi}")
    else:
        lines.append(_stats("prompt", [_prompt_chars(p.prompt) for p in items]))
        lines.append(_stats("chosen", [len(p.chosen) for p in items]))
        lines.append(_stats("rejected", [len(p.rejected) for p in items]))
        not_chosen = sum(not p.chosen_ended for p in items)
        not_rejected = sum(not p.rejected_ended for p in items)
        lines.append(f"responses marked not ended: chosen {not_chosen}, rejected "
                     f"{not_rejected} (of {len(items)} each)")
    return "\n".join(lines)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; use one of: {', '.join(KINDS)}")


def _load(path: str | os.PathLike, kind: str, split: str) -> list:
    _check_kind(kind)
    return load_prompts(path, split) if kind == "prompts" else load_preferences(path, split)


def summarize(path: str | os.PathLike, kind: str, split: str = "train") -> str:
    """A short multi-line summary of a valid data file: kind, rows, length statistics."""
    return _summary(Path(path), kind, _load(path, kind, split))


def check(path: str | os.PathLike, kind: str, split: str = "train") -> str:
    """Validate ``path`` as ``kind`` ("prompts" or "preferences"); return its summary.

    Raises DataError on the first problem found, ValueError for an unknown kind.
    """
    return summarize(path, kind, split)
