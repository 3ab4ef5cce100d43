"""Shared fixtures of the integration tests: the embedded tiny model and dataset, built once per module
into a cache dir of the test's own (never the user's ~/.cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from oomguard.recipes import default


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An oomguard cache dir holding the built default model (pass it as OOMGUARD_CACHE)."""
    path = tmp_path_factory.mktemp("oomguard-cache")
    default.ensure_default_model(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The default model as a plain local model directory (for `trl sft --model_name_or_path`)."""
    return default.ensure_default_model(tmp_path_factory.mktemp("oomguard-cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The shipped SFT dataset as a local dataset directory (`--dataset_name DIR`)."""
    path = tmp_path_factory.mktemp("data")
    shutil.copyfile(default.default_dataset_path(), path / "train.jsonl")
    return path
