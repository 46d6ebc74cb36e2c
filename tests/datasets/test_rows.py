"""Reading rows from json / jsonl / csv / parquet / the hub, split slices, column maps, bad rows."""

import csv
import json

import pytest

from kdtune.datasets.rows import convert_rows, field, load_rows
from kdtune.errors import KDTuneError

RECORDS = [{"q": f"question {i}", "a": str(i)} for i in range(10)]


def write(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(RECORDS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["q", "a"])
            writer.writeheader()
            writer.writerows(RECORDS)
    else:
        pa = pytest.importorskip("pyarrow", reason="parquet support is optional")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


@pytest.mark.parametrize(
    "fmt, where", [("json", "row 3 (1-based)"), ("jsonl", "line 3"), ("csv", "line 4"), ("parquet", "row 3 (1-based)")]
)
def test_formats_and_locations(tmp_path, fmt, where):
    path = write(tmp_path, fmt)
    rows = load_rows(fmt, str(path))
    assert [r.data for r in rows] == RECORDS
    assert rows[2].where == f"{path} {where}"


def test_split_slices_and_column_map(tmp_path):
    path = write(tmp_path, "jsonl")
    assert [r.data["a"] for r in load_rows("jsonl", [path, path], "train[:2]")] == ["0", "1"]
    assert [r.data["a"] for r in load_rows("jsonl", path, "train[80%:]")] == ["8", "9"]
    assert [r.data["a"] for r in load_rows("jsonl", path, "validation[-1:]")] == ["9"]
    rows = load_rows("jsonl", path, column_map={"instruction": "q", "output": "a"})
    assert rows[0].data == {"instruction": "question 0", "output": "0"}
    with pytest.raises(KDTuneError, match="split"):
        load_rows("jsonl", path, "train[1]")


def test_missing_files_and_unknown_sources(tmp_path, monkeypatch):
    with pytest.raises(KDTuneError, match="no such file"):
        load_rows("jsonl", tmp_path / "nope.jsonl")
    with pytest.raises(KDTuneError, match="needs data_files"):
        load_rows("csv")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(KDTuneError, match="'someone/thing'.*no network"):
        load_rows("someone/thing")


def test_hub_dataset_files_by_split(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    (tmp_path / "data" / "test-00000.jsonl").write_text(json.dumps(RECORDS[1]) + "\n")
    calls = []

    def fake_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert [r.data for r in load_rows("someone/thing", split="test")] == [RECORDS[1]]
    assert [r.data for r in load_rows("someone/thing", "data/train-00000.jsonl")] == [RECORDS[0]]
    assert calls == [("someone/thing", "dataset", None), ("someone/thing", "dataset", ["data/train-00000.jsonl"])]


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"q": "ok"}\n{"x": 1}\n\n{broken\n{"q": 3}\n[1]\n')
    rows = load_rows("jsonl", path)
    with pytest.raises(KDTuneError, match=rf"{path} line 2: missing field 'q' \(present: x\) \(and 3 more bad rows\)"):
        convert_rows(rows, lambda d: field(d, "q"), skip_bad_rows=False)
    with pytest.warns(UserWarning, match=rf"skipped 4 bad rows of 5; the first: {path} line 2"):
        good = convert_rows(rows, lambda d: field(d, "q"), skip_bad_rows=True)
    assert [value for _, value in good] == ["ok"]
    with pytest.raises(KDTuneError, match="line 4: not valid JSON"):
        convert_rows(rows[2:3], lambda d: d, skip_bad_rows=False)
    with pytest.raises(KDTuneError, match="line 5: field 'q' must be a string, not int"):
        convert_rows(rows[3:4], lambda d: field(d, "q"), skip_bad_rows=False)
    with pytest.raises(KDTuneError, match="line 6: not a JSON object"):
        convert_rows(rows[4:], lambda d: d, skip_bad_rows=False)
