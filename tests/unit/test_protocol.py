"""The stdlib contract: sizes, fault specs, records, torn journal lines."""

import json

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
