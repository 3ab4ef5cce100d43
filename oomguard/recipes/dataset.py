"""SFT data from local sources only: a JSONL/JSON/Parquet file, a folder of such
files, or a ``datasets`` dataset saved with ``save_to_disk``.

Each example must be one of TRL's formats: ``{"text": ...}`` (language modelling),
``{"messages": [...]}`` (conversational) or ``{"prompt": ..., "completion": ...}``.
Other columns are dropped so that TRL picks the format from what is left.
"""

from __future__ import annotations

from pathlib import Path

from oomguard.errors import UsageError

__all__ = ["DatasetSourceError", "FILE_BUILDERS", "FORMATS", "load_sft_dataset"]

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# column sets TRL understands, in the order we look for them
FORMATS = (("messages",), ("prompt", "completion"), ("text",))
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DatasetSourceError(UsageError):
    """The --dataset path is missing, of an unknown kind, or has no usable columns."""


def load_sft_dataset(source: str | Path, *, split: str = "train"):
    """A ``datasets.Dataset`` with only TRL's columns, from a local ``source``."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetSourceError(
            f"dataset {str(path)!r} does not exist; pass --dataset a .jsonl/.parquet file, "
            "a folder of them, or a folder written by datasets' save_to_disk"
        )
    dataset = _load_saved(path, split) if _is_saved_dataset(path) else _load_files(path)
    return _keep_format_columns(dataset, path)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _load_saved(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DatasetSourceError(
                f"saved dataset {str(path)!r} has splits {sorted(loaded)}, not {split!r}; "
                "save the training split as 'train'"
            )
        return loaded[split]
    return loaded


def _data_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS)
    builders = {FILE_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise DatasetSourceError(
            f"no usable data in {str(path)!r}: expected files ending in {', '.join(FILE_BUILDERS)}"
        )
    if len(builders) > 1:
        raise DatasetSourceError(
            f"{str(path)!r} mixes JSON and Parquet files; keep one kind per folder"
        )
    return builders.pop(), [str(p) for p in files]


def _load_files(path: Path):
    from datasets import load_dataset

    builder, files = _data_files(path)
    return load_dataset(builder, data_files=files, split="train")


def _keep_format_columns(dataset, path: Path):
    columns = set(dataset.column_names)
    for wanted in FORMATS:
        if columns.issuperset(wanted):
            extra = sorted(columns - set(wanted))
            return dataset.remove_columns(extra) if extra else dataset
    raise DatasetSourceError(
        f"dataset {str(path)!r} has columns {sorted(columns)}; SFT needs 'text', 'messages', "
        "or 'prompt' and 'completion': rename a column to one of these"
    )
