"""The stdlib contract: sizes, fault specs, records, torn journal lines."""

import json
import os

import pytest

from oomguard import protocol as p


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("16G", 16 * 2**30), ("16GB", 16 * 10**9),
                                           ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("100", 100)])
def test_parse_size(text, expected):
    assert p.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1GiB", "0", "12 parsecs"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        p.parse_size(bad)


def test_parse_inject():
    faults = p.parse_inject("cuda_oom@step=5; nan@step=9,rank=1;hang@step=3,attempt=2")
    assert faults == [p.Fault("cuda_oom", 5), p.Fault("nan", 9, rank=1), p.Fault("hang", 3, attempt=2)]
    for bad in ("meteor@step=1", "nan@when=3", "nan@step=x"):
        with pytest.raises(ValueError, match="fault"):
            p.parse_inject(bad)


def test_error_record_roundtrip_and_ranks(tmp_path):
    path = tmp_path / "error.json"
    p.write_error_record(path, p.ErrorRecord(kind=p.FailureKind.CUDA_OOM, step=3, rank=1, time=2.0))
    p.write_error_record(path, p.ErrorRecord(kind=p.FailureKind.CRASH, step=3, rank=0, time=5.0))
    (tmp_path / "error.rank2.json").write_text("{torn")
    recs = p.read_error_records(path)
    assert [(r.rank, r.kind) for r in recs] == [(1, p.FailureKind.CUDA_OOM), (0, p.FailureKind.CRASH)]


def test_jsonl_reader_skips_torn_line(tmp_path):
    path = tmp_path / "events.jsonl"
    p.append_jsonl(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"b": 2, "torn')  # a kill mid-write
    assert list(p.read_jsonl(path)) == [{"a": 1}]
    p.append_jsonl(path, {"c": 3})
    assert list(p.read_jsonl(path)) == [{"a": 1}, {"c": 3}]
    assert json.loads(path.read_text().splitlines()[-1]) == {"c": 3}


def test_a_kept_open_appender_writes_what_append_jsonl_writes_and_follows_the_file(tmp_path):
    """The per-step writer keeps its file open (no path lookup per line) and still ends a torn line, and a
    file removed or replaced under it is written afresh at its path."""
    path = tmp_path / "events.jsonl"
    out = p.Appender(path)
    out.append({"a": 1})
    fd = out.fd
    out.append({"b": 2})  # its own last line: no torn-line read needed
    with path.open("a") as f:
        f.write('{"x": 0, "torn')  # another writer killed mid-line
    out.append({"c": 3})
    assert out.fd == fd and list(p.read_jsonl(path)) == [{"a": 1}, {"b": 2}, {"c": 3}]
    path.unlink()
    out.append({"d": 4})
    assert list(p.read_jsonl(path)) == [{"d": 4}]
    replaced = tmp_path / "new.jsonl"
    replaced.write_text('{"e": 5}\n')
    os.replace(replaced, path)  # renamed over: the old inode has no link left
    out.append({"f": 6})
    assert list(p.read_jsonl(path)) == [{"e": 5}, {"f": 6}]
    os.close(out.fd)  # closed behind its back (and the number maybe reused): reopened by path
    taken = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    out.append({"g": 7})
    assert [e for e in p.read_jsonl(path)][-1] == {"g": 7} and (tmp_path / "other").read_bytes() == b""
    os.close(taken)
    out.close()
    with pytest.raises(FileNotFoundError):
        p.Appender(tmp_path / "gone" / "events.jsonl").append({"h": 8})


def test_a_kept_open_beat_moves_the_mtime_and_recreates_a_removed_file(tmp_path):
    path = tmp_path / "heartbeat"
    beat = p.Beat(path)
    beat.touch()
    os.utime(path, (1.0, 1.0))
    beat.touch()
    assert path.stat().st_mtime > 1e9
    path.unlink()
    beat.touch()
    assert path.exists()
