"""Reading dataset rows from files or the Hugging Face hub, each tagged with where it came from.

Every row keeps its location (``data.jsonl line 7``, ``data.parquet row 3``: 1-based line numbers
for text formats, 1-based record numbers otherwise), so a bad row is reported where a user can
find it, and bad rows are either all reported or, with ``skip_bad_rows``, skipped and counted.
"""

import csv
import io
import json
from pathlib import Path
import re
import warnings
from typing import Callable, Iterable, NamedTuple

from kdtune.errors import KDTuneError

FORMATS = ("json", "jsonl", "parquet", "csv")


class Row(NamedTuple):
    where: str
    data: dict
    error: str | None = None  # why the row could not even be read


def _json_row(where: str, record) -> Row:
    return Row(where, record) if isinstance(record, dict) else Row(where, {}, "not a JSON object")


def _text(path: Path) -> str:
    """The file as UTF-8 text (a byte-order mark, as some editors write one, is dropped)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise KDTuneError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at line {line}); "
                          f"save it as UTF-8") from None


def _json_rows(path: Path) -> Iterable[Row]:
    text = _text(path)
    if text.lstrip().startswith("["):  # one JSON array; otherwise JSON lines, as the json loaders accept
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise KDTuneError(f"{path}: not valid JSON: {e}") from None
        yield from (_json_row(f"{path} row {i} (1-based)", r) for i, r in enumerate(records, 1))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield _json_row(f"{path} line {number}", json.loads(line))
            except json.JSONDecodeError as e:
                yield Row(f"{path} line {number}", {}, f"not valid JSON: {e}")


def _csv_rows(path: Path) -> Iterable[Row]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    for record in reader:
        yield Row(f"{path} line {reader.line_num}", record)


def _parquet_rows(path: Path) -> Iterable[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KDTuneError(f"{path}: reading parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise KDTuneError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    return (Row(f"{path} row {i} (1-based)", r) for i, r in enumerate(records, 1))


_READERS = {"json": _json_rows, "jsonl": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows}


def _as_list(data_files) -> list[str]:
    return [data_files] if isinstance(data_files, (str, Path)) else list(data_files or [])


def _hub_files(repo_id: str, data_files, split_name: str) -> list[tuple[str, Path]]:
    """Download a hub dataset; its files named in ``data_files``, else those whose path names the split."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=_as_list(data_files) or None))
    except Exception as e:  # network, authentication or missing repository: all are the user's to fix
        raise KDTuneError(f"source {repo_id!r}: not a file format {FORMATS} and not downloadable from the hub: {e}")
    names = _as_list(data_files) or sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if split_name in str(p.relative_to(root))
    )
    files = [(Path(n).suffix.lstrip("."), root / n) for n in names if Path(n).suffix.lstrip(".") in _READERS]
    if not files:
        raise KDTuneError(f"source {repo_id!r}: no {'/'.join(FORMATS)} files for split '{split_name}'")
    return files


_SPLIT = re.compile(r"^([\w.-]+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


def _parse_split(split: str) -> tuple[str, str | None, str | None]:
    match = _SPLIT.match(split)
    if not match:
        raise KDTuneError(f"split: expected a name with an optional slice like 'train[:90%]', got {split!r}")
    return match.groups()


def _bound(value: str | None, n: int) -> int | None:
    if value is None:
        return None
    return round(n * int(value[:-1]) / 100) if value.endswith("%") else int(value)


def load_rows(source: str, data_files=None, split: str = "train", column_map: dict | None = None) -> list[Row]:
    """Rows of ``data_files`` in format ``source``, or of the hub dataset ``source``.

    ``split`` is a name with an optional slice over all rows (``train[:1000]``, ``train[90%:]``);
    the name only selects files of a hub dataset. ``column_map`` maps the field a dataset expects
    to the column holding it (``{"output": "response"}``).
    """
    name, lo, hi = _parse_split(split)
    if source in FORMATS:
        files = _as_list(data_files)
        if not files:
            raise KDTuneError(f"data_files: a '{source}' source needs data_files")
        for file in files:
            if not Path(file).expanduser().is_file():
                raise KDTuneError(f"data_files: no such file: {file}")
        files = [(source, Path(f).expanduser()) for f in files]
    else:
        files = _hub_files(source, data_files, name)
    rows = [row for fmt, path in files for row in _READERS[fmt](path)]
    rows = rows[_bound(lo, len(rows)) : _bound(hi, len(rows))]
    if column_map:
        rows = [r._replace(data=remap(r.data, column_map)) for r in rows]
    return rows


def remap(data: dict, column_map: dict) -> dict:
    """``data`` with each expected field filled from the column ``column_map`` names for it."""
    data = dict(data)
    for field, column in column_map.items():
        if column in data:
            data[field] = data.pop(column)
    return data


def convert_rows(rows: list[Row], convert: Callable[[dict], object], skip_bad_rows: bool) -> list[tuple[Row, object]]:
    """``convert`` each row; a row it rejects (KDTuneError) is an error, or skipped and counted."""
    good, bad = [], []
    for row in rows:
        try:
            if row.error:
                raise KDTuneError(row.error)
            good.append((row, convert(row.data)))
        except KDTuneError as e:
            bad.append(f"{row.where}: {e}")
    if bad and not skip_bad_rows:
        more = f" (and {len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise KDTuneError(f"{bad[0]}{more}; set skip_bad_rows: true to skip bad rows")
    if bad:
        warnings.warn(f"skipped {len(bad)} bad rows of {len(rows)}; the first: {bad[0]}", stacklevel=3)
    return good


def field(data: dict, name: str, optional: bool = False) -> str:
    """The string field ``name`` of a row (``""`` when optional and absent)."""
    value = data.get(name)
    if value is None:
        if optional:
            return ""
        raise KDTuneError(f"missing field '{name}' (present: {', '.join(map(str, data)) or 'none'})")
    if not isinstance(value, str):
        raise KDTuneError(f"field '{name}' must be a string, not {type(value).__name__}")
    return value
