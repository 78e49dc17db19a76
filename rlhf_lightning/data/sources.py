"""Reading a user's data source into rows, each with the place a person looks to fix it.

Sources:
  *.jsonl                 one JSON object per line, parsed line by line (blank lines are skipped)
  *.json                  a top-level list of objects, or one object per line as in JSONL
  *.parquet               read with pyarrow; cells keep their Parquet types
  *.csv                   header row, then one row per record; every cell is a string, kept exactly
  a folder                saved with `Dataset.save_to_disk` (`split` picks from a DatasetDict), or
                          holding data files: those whose name mentions the split (`train.jsonl`,
                          `prefs-val.parquet`), or all of them when no name mentions any split
  "owner/name"            a Hugging Face Hub dataset: `datasets.load_dataset(name, split=split)`,
                          only when no such local path exists (never trust_remote_code)

Size (over ~300 lines): one reader per source format, each short, beside the row addressing
they share; split by format they would each import the same helpers back.

`where` names the row: "prefs.jsonl:row 12" is line 12 of a JSONL file (1-based, as an editor
shows it); "prefs.parquet:index 3" is the 0-based position `dataset[3]` in a JSON list, a Parquet
file or a dataset; CSV adds the line: "prefs.csv:index 3 (line 5)".

Problems of the whole source (missing, unreadable, no rows) raise DataError. Problems of one row
(invalid JSON, bytes that are not UTF-8, a CSV row with the wrong number of cells) are yielded as a
`RowError` in place of the row when `bad_rows="yield"`, so a caller can skip and count them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rlhf_lightning.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SPLIT_WORDS = {
    "train": {"train"},
    "validation": {"validation", "val", "valid", "dev"},
    "val": {"validation", "val", "valid", "dev"},
    "test": {"test"},
    "eval": {"eval"},
}
_JSONL_FIX = (
    'write one JSON object per line, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
)
_UTF8_FIX = "re-save the file with UTF-8 encoding"


class RowError(Exception):
    """One row is malformed: `what` went wrong and the `fix`; the reader adds where."""

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what, self.fix = what, fix


def json_type(value: object) -> str:
    """The JSON name of a value's type, for messages ("null", "a number", "a list", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def read_rows(
    source: str | Path, split: str = "train", *, bad_rows: str = "raise"
) -> Iterator[tuple[str, object]]:
    """Yield `(where, row)` for every row of `source`; see the module docstring for sources.

    bad_rows="raise" raises DataError at the first malformed row; "yield" yields its RowError in
    place of the row. A source without any row raises DataError ("contains no rows").
    """
    if bad_rows not in ("raise", "yield"):
        raise ValueError(f"bad_rows must be 'raise' or 'yield', got {bad_rows!r}")
    count = 0
    for where, row in _rows(source, split):
        count += 1
        if isinstance(row, RowError) and bad_rows == "raise":
            raise DataError(row.what, where, row.fix)
        yield where, row
    if count == 0:
        raise DataError("contains no rows", str(source), "add rows, or point to the right file")


def _rows(source: str | Path, split: str) -> Iterator[tuple[str, object]]:
    if not str(source).strip():
        raise DataError("no data source given", fix="set the path of a data file or dataset")
    path = Path(source)
    if path.is_dir():
        yield from _dir_rows(path, split)
    elif path.is_file():
        yield from _file_rows(path)
    elif isinstance(source, str) and _is_hub_name(source):
        yield from _dataset_rows(_load_hub(source, split), f"{source}[{split}]")
    else:
        raise DataError(
            "does not exist",
            str(source),
            f"check the path (relative paths start at {os.getcwd()}), "
            "or give a Hugging Face dataset as owner/name",
        )


def _is_hub_name(source: str) -> bool:
    return bool(HUB_NAME.fullmatch(source)) and not source.lower().endswith(DATA_SUFFIXES)


def _file_rows(path: Path) -> Iterator[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            yield from _jsonl_rows(f, str(path))
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)
    else:
        raise DataError(
            f"has unsupported file type {suffix or '(none)'!r}",
            str(path),
            "use a .jsonl, .json, .parquet or .csv file, or a folder saved with save_to_disk",
        )


def _jsonl_rows(lines, name: str) -> Iterator[tuple[str, object]]:
    """Lines of bytes, each decoded strictly and parsed alone; blank lines are skipped."""
    for number, raw in enumerate(lines, 1):
        where = f"{name}:row {number}"
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            byte = f"byte 0x{raw[e.start]:02x} at position {e.start + 1} of the line"
            yield where, RowError(f"is not valid UTF-8 ({byte})", _UTF8_FIX)
            continue
        if text.strip(" \t\r\n"):
            yield where, _parse_json(text)


def _parse_json(text: str) -> object:
    try:
        return _DECODER.decode(text)
    except _DuplicateKey as e:
        return RowError(f"has the key {e.key!r} twice", "keep one value per key")
    except RecursionError:
        return RowError("is nested too deeply to parse", _JSONL_FIX)
    except json.JSONDecodeError as e:
        return RowError(f"is not valid JSON: {e.msg} at column {e.colno}", _JSONL_FIX)
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        return RowError(f"is not valid JSON: {e}", _JSONL_FIX)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    row = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """A .json file: a list of rows, or JSON lines; any other top-level value is an error."""
    data, name = path.read_bytes(), str(path)
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head != b"[":
        value = _parse_json(data.decode("utf-8", errors="replace")) if head else RowError("")
        one_line = len([line for line in data.split(b"\n") if line.strip()]) == 1
        if not isinstance(value, RowError) and not (isinstance(value, dict) and one_line):
            raise DataError(
                f"holds {json_type(value)} at the top level, not a list of rows",
                name,
                "write a list of row objects [{...}, {...}], or one object per line (JSONL)",
            )
        yield from _jsonl_rows(io.BytesIO(data), name)
        return
    text = _decode(data, name)
    try:
        rows = _DECODER.decode(text)
    except _DuplicateKey as e:
        raise DataError(f"has the key {e.key!r} twice in one object", name, "keep one") from None
    except RecursionError:
        raise DataError("is nested too deeply to parse", name, _JSONL_FIX) from None
    except json.JSONDecodeError as e:
        where = f"{name}:line {e.lineno} column {e.colno}"
        raise DataError(f"is not valid JSON: {e.msg}", where, "fix the JSON syntax") from None
    except ValueError as e:
        raise DataError(f"is not valid JSON: {e}", name, "fix the JSON") from None
    for index, row in enumerate(rows):
        yield f"{name}:index {index}", row


def _decode(data: bytes, name: str) -> str:
    """Whole-file strict UTF-8 decoding; an error names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        what = f"is not valid UTF-8 (byte 0x{data[e.start]:02x})"
        raise DataError(what, f"{name}:line {line}", _UTF8_FIX) from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{name}:index {index}", row
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"is not a readable Parquet file ({e})", name, "re-export it, e.g. Dataset.to_parquet"
        ) from None


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    """CSV with a header; cells stay strings, exactly as written (no NA or number guessing)."""
    name = str(path)
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), name), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise DataError(f"has the column {duplicated[0]!r} twice", name, "rename one")
        index, line = 0, reader.line_num + 1
        for cells in reader:
            where = f"{name}:index {index} (line {line})"
            line = reader.line_num + 1
            if not cells:
                continue
            if len(cells) != len(header):
                what = f"has {len(cells)} cells but the header has {len(header)} columns"
                fix = "quote cells that contain commas, and give every row every column"
                yield where, RowError(what, fix)
            else:
                yield where, dict(zip(header, cells, strict=True))
            index += 1
    except csv.Error as e:
        where = f"{name}:line {reader.line_num}"
        raise DataError(f"is not valid CSV ({e})", where, "fix the quoting") from None


def _dir_rows(path: Path, split: str) -> Iterator[tuple[str, object]]:
    saved = ("dataset_info.json", "state.json", "dataset_dict.json")
    if any((path / marker).exists() for marker in saved):
        yield from _dataset_rows(_load_saved(path, split), f"{path}[{split}]")
        return
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataError(
            "is a folder without data files (.jsonl, .json, .parquet, .csv) or a saved dataset",
            str(path),
            "point to a data file, or save the dataset with Dataset.save_to_disk",
        )
    for file in _files_for_split(files, split, path):
        yield from _file_rows(file)


def _files_for_split(files: list[Path], split: str, folder: Path) -> list[Path]:
    every_word = set().union(*SPLIT_WORDS.values())
    words = {f: set(re.split(r"[-_.\s]+", f.stem.lower())) for f in files}
    if not any(w & every_word for w in words.values()):
        return files
    wanted = SPLIT_WORDS.get(split, {split})
    chosen = [f for f in files if words[f] & wanted]
    if not chosen:
        raise DataError(
            f"has no file for split {split!r} (files: {', '.join(f.name for f in files)})",
            str(folder),
            f"name a file after the split (e.g. {split}.jsonl), or pass the file itself",
        )
    return chosen


def _load_saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(
            f"could not be read by load_from_disk ({e})", str(path), "re-save it"
        ) from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            what = f"has no split {split!r} (splits: {', '.join(dataset)})"
            raise DataError(what, str(path), "choose one of the splits it has")
        dataset = dataset[split]
    return dataset


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 -- any failure to fetch a named dataset is the user's to fix
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DataError(
            f"could not be loaded as a Hugging Face dataset, split {split!r} ({reason})",
            name,
            "check the name and split on huggingface.co and that you are online "
            "(HF_HUB_OFFLINE unset), or give a local file path",
        ) from None


def _dataset_rows(dataset, name: str) -> Iterator[tuple[str, object]]:
    for index, row in enumerate(dataset):
        yield f"{name}:index {index}", row
