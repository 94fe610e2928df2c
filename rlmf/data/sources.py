"""Where rows come from: local JSONL / JSON / Parquet files and ``datasets`` hub ids; and JSONL writing.

This is the only place in RLMF that opens data files. A source is a path or a hub id:

- an existing file ending in ``.jsonl``, ``.json`` or ``.parquet`` is read directly (``split`` is ignored);
- anything else (a hub id such as ``"Anthropic/hh-rlhf"``, or a local directory laid out like a hub dataset repo)
  goes to ``datasets.load_dataset(source, subset, split=split, data_dir=data_dir)``. ``subset`` is the dataset's
  config name (its README ``configs:`` block); ``data_dir`` is a folder inside the repo for datasets without configs
  (HH-RLHF's ``harmless-base``).

Every row carries a location used in error messages: ``"data/train.jsonl:17"`` (1-based line) for JSONL,
``"data/train.parquet: record 16 (0-based)"`` for JSON, Parquet and hub rows.

The loaders (:func:`load_pairs`, :func:`load_feedback`, :func:`load_prompts`) parse every row up front, so a bad
row stops the run before training with a :class:`~rlmf.data.formats.DataError` such as
``data/train.jsonl:17: field 'chosen' must be a string or a list of messages, got int``. With
``on_bad_row="skip"`` bad rows are skipped instead and counted in the returned :class:`LoadReport`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

from rlmf.data.formats import DataError, FeedbackExample, PreferencePair, PromptOnly
from rlmf.data.parsing import parse_feedback_row, parse_pair_row, parse_prompt_row

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
ON_BAD_ROW = ("error", "skip")
REPORTED_REASONS = 5

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


@dataclass
class LoadReport:
    """What a loader read: ``rows`` seen, ``loaded`` examples, ``skipped`` bad rows and the first few reasons."""

    source: str
    rows: int = 0
    loaded: int = 0
    skipped: int = 0
    skip_reasons: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"loaded {self.loaded} of {self.rows} rows from {self.source}"
        if self.skipped:
            more = ", ..." if self.skipped > len(self.skip_reasons) else ""
            text += f"; skipped {self.skipped} bad rows: " + "; ".join(self.skip_reasons) + more
        return text


# ---------------------------------------------------------------------------------------------------------------
# Reading raw rows

# A record is (location, row) where row is the decoded dict, or a DataError for a row that could not be decoded
# (so skip mode can skip an invalid JSON line like any other bad row).
_Record = Tuple[str, Union[Dict[str, Any], DataError]]


def _looks_like_file(source: str) -> bool:
    return source.endswith(FILE_EXTENSIONS) or source.startswith(("/", "./", "../", "~"))


def _records(source: PathLike, split: Optional[str], subset: Optional[str], data_dir: Optional[str]
             ) -> Iterator[_Record]:
    path = os.fspath(source)
    if os.path.isfile(path):
        if subset is not None or data_dir is not None:
            raise DataError(f"{path}: subset={subset!r} / data_dir={data_dir!r} apply only to hub datasets and "
                            "directories, not to a single file")
        if path.endswith(".jsonl"):
            return _jsonl_records(path)
        if path.endswith(".json"):
            return _json_records(path)
        if path.endswith(".parquet"):
            return _parquet_records(path)
        raise DataError(f"{path}: unsupported file type; use a {', '.join(FILE_EXTENSIONS)} file or a hub dataset id")
    if not os.path.isdir(path) and _looks_like_file(path):
        raise DataError(f"{path}: no such file or directory")
    return _hub_records(path, split, subset, data_dir)


def _jsonl_records(path: str) -> Iterator[_Record]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            location = f"{path}:{number}"
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                yield location, DataError(f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            yield location, _as_row(row)


def _json_records(path: str) -> Iterator[_Record]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows or {{\"data\": [rows]}}, "
                        f"got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}: record {index} (0-based)", _as_row(row)


def _parquet_records(path: str) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise DataError(f"{path}: cannot read Parquet file: {e}") from e
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}: record {index} (0-based)", row
            index += 1


def _hub_records(source: str, split: Optional[str], subset: Optional[str], data_dir: Optional[str]
                 ) -> Iterator[_Record]:
    import datasets

    described = ", ".join(f"{k} {v!r}" for k, v in (("subset", subset), ("data_dir", data_dir), ("split", split))
                          if v is not None)
    name = f"{source} ({described})"
    if split is None:
        raise DataError(f"{name}: a hub dataset needs a split (e.g. split='train')")
    try:
        dataset = datasets.load_dataset(source, subset, split=split, data_dir=data_dir)
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, ConnectionError, DatasetNotFoundError
        raise DataError(f"{name}: cannot load dataset: {type(e).__name__}: {e}") from e
    for index, row in enumerate(dataset):
        yield f"{name}: record {index} (0-based)", row


def _as_row(row: Any) -> Union[Dict[str, Any], DataError]:
    if isinstance(row, dict):
        return row
    return DataError(f"row must be a JSON object with fields, got {type(row).__name__}")


def read_rows(source: PathLike, *, split: Optional[str] = "train", subset: Optional[str] = None,
              data_dir: Optional[str] = None) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Yield ``(location, row)`` for every row of ``source``; a row that is not a JSON object raises
    :class:`DataError` (``"data/train.jsonl:3: invalid JSON: ..."``)."""
    for location, row in _records(source, split, subset, data_dir):
        if isinstance(row, DataError):
            raise DataError(f"{location}: {row}")
        yield location, row


# ---------------------------------------------------------------------------------------------------------------
# Loading examples


def _load(parse: Callable[[Dict[str, Any]], T], source: PathLike, split: Optional[str], subset: Optional[str],
          data_dir: Optional[str], on_bad_row: str) -> Tuple[List[T], LoadReport]:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not one of {ON_BAD_ROW}")
    report = LoadReport(source=os.fspath(source))
    examples: List[T] = []
    for location, row in _records(source, split, subset, data_dir):
        report.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            example = parse(row)
        except DataError as e:
            if on_bad_row == "error":
                raise DataError(f"{location}: {e}") from None
            report.skipped += 1
            if len(report.skip_reasons) < REPORTED_REASONS:
                report.skip_reasons.append(f"{location}: {e}")
            continue
        examples.append(example)
    report.loaded = len(examples)
    if not examples:
        raise DataError(f"{report}: no usable rows" if report.skipped else f"{report.source}: no rows")
    return examples, report


def load_pairs(source: PathLike, *, split: Optional[str] = "train", subset: Optional[str] = None,
               data_dir: Optional[str] = None, on_bad_row: str = "error", transcripts: str = "chat"
               ) -> Tuple[List[PreferencePair], LoadReport]:
    """Every row of ``source`` as a :class:`PreferencePair` (formats: :func:`~rlmf.data.parsing.parse_pair_row`;
    HH transcripts read as conversations unless ``transcripts="raw"``)."""
    return _load(functools.partial(parse_pair_row, transcripts=transcripts), source, split, subset, data_dir,
                 on_bad_row)


def load_feedback(source: PathLike, *, split: Optional[str] = "train", subset: Optional[str] = None,
                  data_dir: Optional[str] = None, on_bad_row: str = "error", transcripts: str = "chat"
                  ) -> Tuple[List[FeedbackExample], LoadReport]:
    """Every row of ``source`` as a :class:`FeedbackExample` (``prompt`` / ``completion`` / ``label`` rows)."""
    return _load(functools.partial(parse_feedback_row, transcripts=transcripts), source, split, subset, data_dir,
                 on_bad_row)


def load_prompts(source: PathLike, *, split: Optional[str] = "train", subset: Optional[str] = None,
                 data_dir: Optional[str] = None, on_bad_row: str = "error", transcripts: str = "chat"
                 ) -> Tuple[List[PromptOnly], LoadReport]:
    """Every row of ``source`` as a :class:`PromptOnly` (``prompt`` rows, or the prompts of preference rows)."""
    return _load(functools.partial(parse_prompt_row, transcripts=transcripts), source, split, subset, data_dir,
                 on_bad_row)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_jsonl(path: PathLike, rows: Iterable[Union[PreferencePair, FeedbackExample, PromptOnly, Dict[str, Any]]]
                ) -> int:
    """Write ``rows`` (examples, via their ``to_row()``, or plain dicts) as JSON Lines that the loaders read back;
    return the number written. Parent folders are created; the file appears only once complete."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                record = row if isinstance(row, dict) else row.to_row()
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


def read_written(path: PathLike, kind: str = "pairs") -> List[Union[PreferencePair, FeedbackExample]]:
    """The rows a stage wrote with :func:`write_jsonl` (``kind``: ``pairs`` or ``thumbs``), read back; an empty file
    (a stage that produced none) is an empty list, where the loaders refuse a source without rows."""
    if not os.path.getsize(path):
        return []
    return (load_pairs if kind == "pairs" else load_feedback)(path)[0]
