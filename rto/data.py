"""Prompt and preference datasets: loading, validation, atomic writing, summaries.

Three on-disk formats are accepted, for both kinds of data:
  * JSON Lines (``.jsonl`` or ``.json``): one JSON object per line, blank lines skipped.
    Errors name the 1-based physical line: ``data/p.jsonl:17: ...``.
  * Parquet (``.parquet``). Errors name the 1-based row: ``data/p.parquet: row 17: ...``.
  * A folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``;
    the ``split`` argument picks the split). Errors name the 1-based row, as for Parquet.

A message list is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``. Loaded
messages are normalised to exactly these two keys; other keys are dropped.

Files are read as they stream (a line or a batch of rows at a time), never whole. A row larger
than ``max_row_bytes`` (default ``MAX_ROW_BYTES``, 1 MiB: a JSON Lines line in bytes, or the
UTF-8 text of a Parquet/datasets row) and text that is not valid Unicode (bytes that are not
UTF-8, lone surrogates such as the JSON escape ``\\ud800``) are refused with the line or row, so a
file that ``check`` passes loads the same way in every stage.

Every problem is reported as a ``DataError`` (a ``ValueError``) that says where, what is wrong,
and what to do about it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
KINDS = ("prompts", "preferences")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
MAX_ROW_BYTES = 1024 * 1024  # default limit on one row: a JSON Lines line, or the text of a Parquet/datasets row
MESSAGE_FIELDS = ("prompt", "chosen", "rejected")  # fields whose lists are message lists
_BATCH_ROWS = 256  # rows read at a time from Parquet files and datasets folders
_SURROGATE = re.compile("[\ud800-\udfff]")

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


def _check_limit(max_row_bytes: int) -> int:
    if isinstance(max_row_bytes, bool) or not isinstance(max_row_bytes, int) or max_row_bytes < 1:
        raise ValueError(f"max_row_bytes must be a positive whole number of bytes, got {max_row_bytes!r}; "
                         f"the default is {MAX_ROW_BYTES:,} (1 MiB)")
    return max_row_bytes


def _too_long(limit: int, unit: str) -> str:
    return (f"this {unit} holds more than {limit:,} bytes, the limit per row; a row this large is almost always a "
            "broken or wrong file: shorten or drop it, or raise the limit (max_row_bytes; `rto data check "
            "--max_row_bytes`)")


def _jsonl_lines(path: Path, max_row_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(number, raw line without its line break)``, read one line at a time from a binary handle.

    No more than ``max_row_bytes`` + 2 bytes are read for a line: a longer one raises DataError.
    """
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(max_row_bytes + 2):
            number += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > max_row_bytes:
                raise DataError(path, number, _too_long(max_row_bytes, "line"))
            yield number, raw


def _jsonl_rows(path: Path, max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, dict]]:
    seen_content = False
    for number, raw in _jsonl_lines(path, max_row_bytes):
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


def _parquet_rows(path: Path) -> Iterator[dict]:
    """The rows of a Parquet file, read a batch of rows at a time."""
    import pyarrow.parquet as pq

    def damaged(e: Exception) -> DataError:
        return DataError(path, None, f"could not be read as Parquet ({_one_line(e)}); check that "
                                     "the file is a complete Parquet file, or use JSON Lines")

    try:
        reader = pq.ParquetFile(path)
        if reader.metadata.num_rows == 0:
            raise DataError(path, None, "the dataset has no rows; it needs at least one example")
        batches = reader.iter_batches(batch_size=_BATCH_ROWS)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for damaged files
        raise damaged(e) from None
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except Exception as e:
            raise damaged(e) from None
        if rows is None:
            return
        yield from rows


def _datasets_rows(path: Path, split: str) -> Iterator[dict]:
    """The rows of a ``save_to_disk`` folder (one split of a DatasetDict), a batch of rows at a time."""
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
    if loaded.num_rows == 0:
        raise DataError(path, None, "the dataset has no rows; it needs at least one example")
    for batch in loaded.iter(batch_size=_BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield dict(zip(names, values))


def _shown(text: str, limit: int = 40) -> str:
    """``text`` safe to print: lone surrogates as ``\\udxxx`` escapes, cut to ``limit`` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _surrogate_check(text: str, where: str) -> None:
    found = _SURROGATE.search(text)
    if found:
        raise _RowError(f"{where} holds a lone surrogate \\u{ord(found.group()):04x} (character {found.start() + 1}), "
                        "which is not valid Unicode text; write the character itself or a complete surrogate pair "
                        "(such as \\ud83d\\ude00), or drop this row")


def _scan(row: Mapping) -> int:
    """Reject lone surrogates in any string of ``row`` (field names included); return its size in bytes
    (UTF-8 text and binary values; other values count 8 bytes)."""
    size, stack = 0, []
    for key, value in row.items():
        _surrogate_check(str(key), "a field name")
        stack.append((value, f"field '{_shown(str(key))}'", key in MESSAGE_FIELDS))
    while stack:
        value, where, messages = stack.pop()
        if isinstance(value, str):
            _surrogate_check(value, where)
            size += len(value.encode("utf-8"))
        elif isinstance(value, (bytes, bytearray)):
            size += len(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                _surrogate_check(str(key), f"a key in {where}")
                stack.append((item, f"{where}, key '{_shown(str(key))}'", False))
        elif isinstance(value, (list, tuple)):
            noun = "message" if messages else "item"
            stack.extend((item, f"{where}, {noun} {i}", False) for i, item in enumerate(value, start=1))
        else:
            size += 8
    return size


def read_rows(path: str | os.PathLike, split: str = "train",
              max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[tuple[int, dict, str]]:
    """Yield ``(number, row, unit)`` for every row of a data file, read as it streams.

    ``number`` is the 1-based physical line (``unit == "line"``, JSON Lines) or the 1-based row
    (``unit == "row"``, Parquet and ``save_to_disk`` folders). Fields are not validated here, but
    every row is checked to be valid Unicode text (no lone surrogates) and no larger than
    ``max_row_bytes`` (a JSON Lines line in bytes; the text of any other row in UTF-8 bytes).
    File-level problems and these row problems raise DataError.
    """
    path, limit = Path(path), _check_limit(max_row_bytes)
    fmt = _format_of(path)
    if fmt == "jsonl":
        numbered = ((number, row, "line") for number, row in _jsonl_rows(path, limit))
    else:
        rows = _parquet_rows(path) if fmt == "parquet" else _datasets_rows(path, split)
        numbered = ((number, row, "row") for number, row in enumerate(rows, start=1))
    for number, row, unit in numbered:
        try:
            size = _scan(row)
        except _RowError as e:
            raise DataError(path, number, str(e), unit) from None
        if unit == "row" and size > limit:
            raise DataError(path, number, _too_long(limit, "row"), unit)
        yield number, row, unit


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


def _rows_matching(path, split, where, max_row_bytes=MAX_ROW_BYTES):
    for number, row, unit in read_rows(path, split, max_row_bytes):
        if where and any(row.get(k) != v for k, v in where.items()):
            continue
        yield number, row, unit


def iter_prompts(path: str | os.PathLike, split: str = "train", where: Mapping[str, Any] | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[list[dict]]:
    """Validated prompts one at a time, as the file streams (see load_prompts)."""
    for number, row, unit in _rows_matching(path, split, where, max_row_bytes):
        noun = f"each {unit}"
        try:
            yield _prompt(_require(row, "prompt", f"{noun} {_PROMPT_HELP}"), "prompt", noun)
        except _RowError as e:
            raise DataError(path, number, str(e), unit) from None


def iter_preferences(path: str | os.PathLike, split: str = "train", where: Mapping[str, Any] | None = None,
                     max_row_bytes: int = MAX_ROW_BYTES) -> Iterator[PreferencePair]:
    """Validated preference pairs one at a time, as the file streams (see load_preferences)."""
    for number, row, unit in _rows_matching(path, split, where, max_row_bytes):
        try:
            yield _preference(row, f"each {unit}")
        except _RowError as e:
            raise DataError(path, number, str(e), unit) from None


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------

def load_prompts(path: str | os.PathLike, split: str = "train", where: Mapping[str, Any] | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES) -> list[list[dict]]:
    """Load prompts as message lists; a text prompt becomes ``[{"role": "user", "content": text}]``.

    Each row needs ``prompt``: non-empty text, or a message list ending with a user message.
    Extra fields are ignored. ``split`` picks the split of a ``DatasetDict`` folder; ``where``
    keeps only rows whose fields equal the given values (e.g. ``{"split": "eval"}``). A row
    larger than ``max_row_bytes`` (default MAX_ROW_BYTES, 1 MiB) or holding text that is not
    valid Unicode raises DataError.
    """
    return list(iter_prompts(path, split, where, max_row_bytes))


def load_preferences(path: str | os.PathLike, split: str = "train", where: Mapping[str, Any] | None = None,
                     max_row_bytes: int = MAX_ROW_BYTES) -> list[PreferencePair]:
    """Load preference pairs.

    Each row has ``chosen`` and ``rejected`` (text, or a message list whose last message is the
    assistant's answer, as in UltraFeedback-binarized) and ``prompt`` (text or a message list;
    optional when ``chosen`` is a message list, whose messages before the answer are then the
    prompt). Optional booleans ``chosen_ended`` / ``rejected_ended`` default to true. Row size
    and Unicode are checked as in load_prompts.
    """
    return list(iter_preferences(path, split, where, max_row_bytes))


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


class _Lengths:
    """Running min / mean / max of lengths, so a summary never holds the rows."""

    def __init__(self, name: str):
        self.name, self.count, self.total, self.low, self.high = name, 0, 0, None, None

    def add(self, length: int) -> None:
        self.count += 1
        self.total += length
        self.low = length if self.low is None else min(self.low, length)
        self.high = length if self.high is None else max(self.high, length)

    def line(self) -> str:
        mean = self.total / self.count
        return f"  {self.name:<9} min {self.low:,} / mean {mean:,.1f} / max {self.high:,}"


def _format_name(path: Path) -> str:
    if path.is_dir():
        return "datasets folder"
    return "Parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "JSON Lines"


def _summary(path: Path, kind: str, items: Iterable) -> str:
    """Summarise validated items (prompts or PreferencePairs) as they stream by."""
    names = ("prompt",) if kind == "prompts" else ("prompt", "chosen", "rejected")
    lengths = {name: _Lengths(name) for name in names}
    rows = multi = not_chosen = not_rejected = 0
    for item in items:
        rows += 1
        if kind == "prompts":
            lengths["prompt"].add(_prompt_chars(item))
            multi += len(item) > 1
            continue
        lengths["prompt"].add(_prompt_chars(item.prompt))
        lengths["chosen"].add(len(item.chosen))
        lengths["rejected"].add(len(item.rejected))
        not_chosen += not item.chosen_ended
        not_rejected += not item.rejected_ended
    lines = [f"{path}: {kind} ({_format_name(path)})", f"rows: {rows}"]
    if not rows:
        return "\n".join(lines)
    lines.append("length in characters:")
    lines.extend(stat.line() for stat in lengths.values())
    if kind == "prompts":
        lines.append(f"multi-message prompts: {multi}")
    else:
        lines.append(f"responses marked not ended: chosen {not_chosen}, rejected "
                     f"{not_rejected} (of {rows} each)")
    return "\n".join(lines)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; use one of: {', '.join(KINDS)}")


def _stream(path: str | os.PathLike, kind: str, split: str, max_row_bytes: int) -> Iterator:
    _check_kind(kind)
    _check_limit(max_row_bytes)
    reader = iter_prompts if kind == "prompts" else iter_preferences
    return reader(path, split, max_row_bytes=max_row_bytes)


def summarize(path: str | os.PathLike, kind: str, split: str = "train", max_row_bytes: int = MAX_ROW_BYTES) -> str:
    """A short multi-line summary of a valid data file: kind, rows, length statistics.

    The file is read as it streams: memory stays small whatever its size.
    """
    return _summary(Path(path), kind, _stream(path, kind, split, max_row_bytes))


def check(path: str | os.PathLike, kind: str, split: str = "train", max_row_bytes: int = MAX_ROW_BYTES) -> str:
    """Validate ``path`` as ``kind`` ("prompts" or "preferences"); return its summary.

    Every row is validated as the stages read it, and no larger than ``max_row_bytes``
    (default MAX_ROW_BYTES, 1 MiB). Raises DataError on the first problem found, ValueError
    for an unknown kind or limit.
    """
    return summarize(path, kind, split, max_row_bytes)
