"""Loading SFT data from the three local source kinds, in TRL's three formats."""

import json

import pytest

from oomguard.recipes.dataset import DatasetSourceError, load_sft_dataset
from oomguard.recipes.default import default_dataset_path

ROWS = {
    "text": [{"text": f"example {i}", "id": i} for i in range(5)],
    "messages": [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                 for i in range(4)],
    "prompt": [{"prompt": f"p{i}", "completion": f"c{i}", "source": "x"} for i in range(3)],
}
EXPECTED_COLUMNS = {"text": ["text"], "messages": ["messages"], "prompt": ["prompt", "completion"]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_jsonl_file_keeps_only_format_columns(tmp_path, fmt):
    ds = load_sft_dataset(_write_jsonl(tmp_path / "d.jsonl", ROWS[fmt]))
    assert len(ds) == len(ROWS[fmt])
    assert sorted(ds.column_names) == sorted(EXPECTED_COLUMNS[fmt])


def test_folder_of_jsonl_files_is_concatenated(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", ROWS["text"][:2])
    _write_jsonl(tmp_path / "b.jsonl", ROWS["text"][2:])
    ds = load_sft_dataset(tmp_path)
    assert sorted(ds["text"]) == sorted(r["text"] for r in ROWS["text"])


def test_folder_of_parquet_files(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ROWS["prompt"]).to_parquet(str(tmp_path / "part-0.parquet"))
    ds = load_sft_dataset(tmp_path)
    assert ds["completion"] == [r["completion"] for r in ROWS["prompt"]]


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_to_disk_dataset(tmp_path, as_dict):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(ROWS["messages"])
    (DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    loaded = load_sft_dataset(tmp_path / "saved")
    assert loaded["messages"] == ds["messages"]


def test_the_shipped_default_loads_as_chats():
    ds = load_sft_dataset(default_dataset_path())
    assert ds.column_names == ["messages"] and len(ds) >= 200


def test_missing_path_names_it_and_the_fix(tmp_path):
    with pytest.raises(DatasetSourceError, match="does not exist.*--dataset"):
        load_sft_dataset(tmp_path / "nope.jsonl")


def test_unknown_columns_are_named(tmp_path):
    with pytest.raises(DatasetSourceError, match=r"\['answer', 'question'\].*rename"):
        load_sft_dataset(_write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))


def test_folder_without_data_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetSourceError, match="no usable data"):
        load_sft_dataset(tmp_path)
