"""Data files -> records: JSONL, JSON arrays, CSV/TSV, parquet, and folders saved by HF `datasets`.

Five record formats, detected per record from its keys (one file may mix them):

    text               {"text": "..."}
    prompt_completion  {"prompt": "...", "completion": "..."}
    messages           {"messages": [{"role": "...", "content": "..."}, ...]}
    alpaca             {"instruction": "...", "input": "...", "output": "..."}       input optional
    sharegpt           {"conversations": [{"from": "human|gpt|system", "value": "..."}, ...]}

A record's keys must name exactly one format: "text"; "prompt" or "completion"; "messages";
"instruction" or "output"; "conversations". Keys of two formats (the Alpaca dataset's extra "text"
column, say) are refused rather than guessed at: `format=` names the format to read, and the other
formats' keys are then dropped. Any other key is kept and ignored.

Every record has a number N, 1-based, and every error starts with `path:N:` and names the field.
N is the line where the record starts for JSONL and CSV/TSV (the CSV header is line 1, so the first
record is line 2), and the record's position for JSON arrays, parquet and `datasets` folders
(record N is `data[N - 1]`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DataError

__all__ = ["FORMATS", "DataError", "read_records", "read_jsonl", "record_format", "as_pair", "as_messages"]

FORMATS = ("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt")

# The keys that make a record of each format, and all the keys each format reads.
_MARKERS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",),
            "alpaca": ("instruction", "output"), "sharegpt": ("conversations",)}
_FIELDS = {**_MARKERS, "alpaca": ("instruction", "input", "output")}
_ALL_FIELDS = tuple(key for keys in _FIELDS.values() for key in keys)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ALPACA_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------------------------
# Files


def read_records(path: str | os.PathLike, format: str = "auto") -> list[tuple[int, dict]]:
    """`(N, record)` for every record of a data file or `datasets` folder, each checked to be of `format`.

    By the path: a directory saved by `datasets` (`save_to_disk`; of a DatasetDict the "train" split,
    or `DIR:SPLIT`), `.csv` / `.tsv` (a header row, every cell a string; `messages` / `conversations`
    cells hold JSON), `.parquet` / `.pq`, `.json` (an array of records, or JSON Lines), anything else
    JSON Lines. In parquet and `datasets` tables a null cell is an absent field, so one table can mix formats.
    """
    _check_format_name(format)
    source = str(path)
    file, split = Path(source), None
    if not file.exists() and ":" in source and Path(source.rsplit(":", 1)[0]).is_dir():
        file, split = Path(source.rsplit(":", 1)[0]), source.rsplit(":", 1)[1]
    suffix = file.suffix.lower()
    if file.is_dir():
        rows, from_cells = _saved_dataset_rows(file, split, source), False
    elif suffix in (".csv", ".tsv"):
        rows, from_cells = _csv_rows(file, "\t" if suffix == ".tsv" else ","), True
    elif suffix in (".parquet", ".pq"):
        rows, from_cells = _parquet_rows(file), False
    elif suffix == ".json":
        rows, from_cells = _json_rows(file), False
    else:
        rows, from_cells = _jsonl_rows(file), False
    return _checked_records(rows, source, format, from_cells)


def read_jsonl(path: str | os.PathLike, format: str = "auto") -> list[tuple[int, dict]]:
    """`(line number, record)` for every non-blank line of a JSON Lines file, whatever its name."""
    _check_format_name(format)
    return _checked_records(_jsonl_rows(Path(path)), str(path), format, from_cells=False)


def _check_format_name(format: str) -> None:
    if format not in FORMATS:
        raise DataError(f"format {format!r}: expected one of {', '.join(FORMATS)}")


def _checked_records(rows: Iterator[tuple[int, Any]], source: str, format: str,
                     from_cells: bool) -> list[tuple[int, dict]]:
    records = []
    for number, record in rows:  # checked as they come, so the first error in the file is the one reported
        where = f"{source}:{number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
        if from_cells:
            record = _decode_json_cells(record, where, format)
        kind = record_format(record, where, format)
        if format != "auto":
            record = {key: value for key, value in record.items() if key in _FIELDS[kind] or key not in _ALL_FIELDS}
        records.append((number, record))
    if not records:
        raise DataError(f"{source}: no records (the file is empty or blank)")
    return records


def _read_bytes(path: Path, expected: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected {expected}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from None


def _decode(raw: bytes, where: str) -> str:
    try:  # utf-8-sig drops a byte-order mark, which some editors write at the start of a file
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer with too many digits, deep nesting
        raise DataError(f"{where}: invalid JSON: {type(error).__name__}: {str(error)[:100]}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    raw = _read_bytes(path, "a JSONL file")
    # Split on b"\n" only: str.splitlines would also split on characters that JSON strings may hold.
    for line_number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{line_number}"
        text = _decode(line, where) if line_number == 1 else _decode_line(line, where)
        if text.strip():
            yield line_number, _parse_json(text, where)


def _decode_line(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not valid UTF-8 (byte {error.start + 1})") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array of records; a `.json` file that is not one is read as JSON Lines (as many are)."""
    raw = _read_bytes(path, "a JSON file")
    if not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            yield from _jsonl_rows(path)
        except DataError:
            try:
                whole = json.loads(raw.decode("utf-8-sig"))
            except (ValueError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                keys = ", ".join(repr(key) for key in list(whole)[:5])
                raise DataError(f"{path}: one JSON object (keys: {keys}); expected an array of records "
                                "or one record per line (JSON Lines)") from None
            raise
        return
    text = _decode(raw, str(path))
    try:
        array = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}: invalid JSON: {type(error).__name__}: {str(error)[:100]}") from None
    yield from enumerate(array, start=1)


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    raw = _read_bytes(path, "a CSV file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {error.start + 1} of the file)") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    limit = csv.field_size_limit(2**31 - 1)  # the default, 128 KiB, is shorter than many texts
    try:
        while True:
            start = reader.line_num + 1  # the line the next row starts on (a quoted cell may span lines)
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                raise DataError(f"{path}:{start}: not valid CSV: {error}") from None
            if not row:  # a blank line
                continue
            if header is None:
                header = _csv_header(row, path)
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{start}: {len(row)} fields, but the header (line 1) has {len(header)}")
            yield start, dict(zip(header, row))
    finally:
        csv.field_size_limit(limit)


def _csv_header(row: list[str], path: Path) -> list[str]:
    seen: set[str] = set()
    for name in row:
        if name in seen:
            raise DataError(f"{path}:1: column {name!r} appears twice in the header")
        seen.add(name)
    return row


def _decode_json_cells(record: dict, where: str, format: str) -> dict:
    """A CSV cell is a string: the `messages` / `conversations` lists are written in it as JSON."""
    record = dict(record)
    for key, kind in (("messages", "messages"), ("conversations", "sharegpt")):
        if key in record and format in ("auto", kind):
            value = _parse_json(record[key], f"{where}: field '{key}'")
            record[key] = value
    return record


def _table_rows(rows: list[dict]) -> Iterator[tuple[int, dict]]:
    for number, row in enumerate(rows, start=1):
        yield number, {key: value for key, value in row.items() if value is not None}


def _known_columns(names: list[str], where: str) -> list[str]:
    """The columns some format reads (others, such as images, are never loaded)."""
    columns = [name for name in names if name in _ALL_FIELDS]
    if not columns:
        shown = ", ".join(repr(name) for name in names[:8]) or "none"
        raise DataError(f"{where}: no column of a known format: expected 'text', 'prompt'+'completion', 'messages', "
                        f"'instruction'+'output' or 'conversations' (columns: {shown})")
    return columns


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        columns = _known_columns(pq.read_schema(path).names, str(path))
        rows = pq.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: cannot read as parquet: {str(error)[:200]}") from None
    yield from _table_rows(rows)


def _saved_dataset_rows(folder: Path, split: str | None, source: str) -> Iterator[tuple[int, dict]]:
    """The rows of a `datasets.save_to_disk` folder: a Dataset, or one split of a DatasetDict."""
    is_dict, is_dataset = (folder / "dataset_dict.json").is_file(), (folder / "state.json").is_file()
    if not (is_dict or is_dataset):
        raise DataError(f"{source}: is a directory, but not one saved by datasets' save_to_disk (no state.json or "
                        "dataset_dict.json); give a data file, or such a folder")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises many types for a damaged folder
        raise DataError(f"{source}: cannot load with datasets.load_from_disk: {type(error).__name__}: "
                        f"{str(error)[:200]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in loaded:
            splits = ", ".join(repr(s) for s in loaded) or "none"
            raise DataError(f"{source}: no split {name!r} (splits: {splits}); name one as {folder}:SPLIT")
        loaded = loaded[name]
    elif split is not None:
        raise DataError(f"{source}: {folder} holds one dataset, not splits; give it without ':{split}'")
    columns = _known_columns(list(loaded.column_names), source)
    yield from _table_rows(loaded.select_columns(columns).to_list())


# ---------------------------------------------------------------------------------------------
# Record formats


def record_format(record: dict, where: str, format: str = "auto") -> str:
    """The record's format (one of FORMATS but "auto"), after checking its fields; a DataError otherwise.

    With `format="auto"` the keys decide; otherwise the record must have that format's fields, and
    other formats' keys are ignored.
    """
    if format == "auto":
        kinds = [kind for kind, markers in _MARKERS.items() if any(key in record for key in markers)]
        if len(kinds) > 1:
            present = [key for key in _ALL_FIELDS if key in record]
            # Guessing which one was meant would silently train on the wrong tokens.
            raise DataError(f"{where}: fields {present} belong to different formats ({', '.join(kinds)}); "
                            f"choose one with format= (--format {'|'.join(kinds)})")
        if not kinds:
            keys = ", ".join(repr(key) for key in list(record)[:5]) or "none"
            raise DataError(f"{where}: field 'text', 'prompt'/'completion', 'messages', 'instruction'/'output' or "
                            f"'conversations': missing (keys: {keys})")
        format = kinds[0]
    _CHECKS[format](record, where)
    return format


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _expect_string(value: Any, where: str, name: str) -> None:
    """Every text field passes here: a string, and valid Unicode (which a tokenizer can encode)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}': expected a string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell a lone UTF-16 surrogate; Python keeps it in the str, and a tokenizer then fails
        # with an error that names neither the file nor the line.
        raise DataError(f"{where}: field '{name}': holds a lone UTF-16 surrogate (such as \\ud800), which is "
                        "not valid Unicode text") from None


def _expect_fields(record: dict, where: str, names: tuple[str, ...], what: str) -> None:
    for name in names:
        if name not in record:
            raise DataError(f"{where}: field '{name}': missing ({what} needs {' and '.join(map(repr, names))})")
        _expect_string(record[name], where, name)


def _expect_turns(record: dict, where: str, name: str, keys: tuple[str, str]) -> list[dict]:
    turns = record.get(name)
    if name not in record:
        raise DataError(f"{where}: field '{name}': missing")
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type_name(turns)
        raise DataError(f"{where}: field '{name}': expected a non-empty list of messages, got {got}")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{name}[{index}]': expected an object, got {_type_name(turn)}")
        for key in keys:
            if key not in turn:
                raise DataError(f"{where}: field '{name}[{index}].{key}': missing")
            _expect_string(turn[key], where, f"{name}[{index}].{key}")
    return turns


def _check_messages(record: dict, where: str) -> None:
    _expect_turns(record, where, "messages", ("role", "content"))


def _check_alpaca(record: dict, where: str) -> None:
    _expect_fields(record, where, ("instruction", "output"), "an Alpaca record")
    if record.get("input") is not None:  # absent, null and "" all mean no input
        _expect_string(record["input"], where, "input")


def _check_sharegpt(record: dict, where: str) -> None:
    for index, turn in enumerate(_expect_turns(record, where, "conversations", ("from", "value"))):
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: field 'conversations[{index}].from': {turn['from']!r} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}")


_CHECKS: dict[str, Callable[[dict, str], None]] = {
    "text": lambda record, where: _expect_fields(record, where, ("text",), "a text record"),
    "prompt_completion": lambda record, where: _expect_fields(record, where, ("prompt", "completion"),
                                                              "a prompt record"),
    "messages": _check_messages,
    "alpaca": _check_alpaca,
    "sharegpt": _check_sharegpt,
}


def as_pair(record: dict, kind: str, chat: bool) -> tuple[str, str]:
    """(prompt, completion) of a prompt_completion or Alpaca record (checked by `record_format`).

    Alpaca: the prompt is the instruction, then "\\n\\n" and the input when the input is not empty;
    the completion is the output. As raw text (`chat=False`) another "\\n\\n" ends the prompt, so that
    the output does not run on from it; in a chat the prompt is the user's turn as it is.
    """
    if kind == "prompt_completion":
        return record["prompt"], record["completion"]
    assert kind == "alpaca", kind
    prompt = record["instruction"]
    if record.get("input"):
        prompt += ALPACA_SEPARATOR + record["input"]
    return prompt + ("" if chat else ALPACA_SEPARATOR), record["output"]


def as_messages(record: dict, kind: str) -> list[dict]:
    """The chat of a messages or ShareGPT record (human -> user, gpt -> assistant, system -> system)."""
    if kind == "messages":
        return record["messages"]
    assert kind == "sharegpt", kind
    return [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
