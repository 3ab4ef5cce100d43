"""Shared fixtures of the integration tests: the embedded tiny model and dataset, built once per module
into a cache dir of the test's own (never the user's ~/.cache)."""

from __future__ import annotations

import os
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


# The longest test files first (measured, `--durations`): with `-n 2 --dist loadfile` a file runs on one
# worker, and a long file started last is the run's tail. Longest first shortens the wall time; the order
# of everything else is pytest's own, then LAST. (This hook sees the whole session's items, whichever conftest
# holds it; scripts/test.sh passes --no-loadscope-reorder, without which xdist would hand out the files by their
# number of tests instead.) The runs several files read (tests/integration/_shared.py) are made once, by whichever
# file asks first; a reader that asks while the other worker makes it waits (slower, never wrong). So the files
# that only read come LAST, and test_wrap_commands.py (~70 s of runs of its own besides the two it reads:
# test_wrap_matrix.py's trl_flags OOM run, test_spare_training.py's warm run) starts a few minutes in.
LONGEST_FIRST = ("integration/test_wrap_matrix.py", "integration/test_reliability.py", "integration/test_nodes.py",
                 "integration/test_grow_back.py", "integration/test_slurm_sbatch.py",
                 "integration/test_resume_integrity.py", "integration/test_wrap_commands.py",
                 "integration/test_guard_training.py",
                 "integration/test_distributed.py", "integration/test_resume_effective_batch.py",
                 "integration/test_lr_in_force.py", "integration/test_culprit_batches.py",
                 "integration/test_spare_training.py", "integration/test_demo.py",
                 "integration/test_catalogue_runs.py", "integration/test_spare_launcher.py",
                 "integration/test_resume_wrapped_packed.py", "integration/test_wrap_site.py",
                 "integration/test_resume_samples.py", "integration/test_light_install.py",
                 "integration/test_resume_packed.py", "integration/test_recipe_sft.py",
                 "integration/test_slurm_signals.py", "integration/test_nan_skip.py", "integration/test_free_rungs.py",
                 "integration/test_resume_precision.py", "integration/test_probe.py")
# readers only: test_resume_wrapped.py (the matrix's trl_flags runs), test_report_html.py (test_demo.py's demo run)
LAST = ("integration/test_resume_wrapped.py", "integration/test_report_html.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        path = Path(str(item.fspath)).as_posix()
        if any(path.endswith(tail) for tail in LAST):
            return len(LONGEST_FIRST) + 1 + next(i for i, tail in enumerate(LAST) if path.endswith(tail))
        return next((i for i, tail in enumerate(LONGEST_FIRST) if path.endswith(tail)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file and among the rest, collection order


@pytest.fixture(autouse=True)
def _no_oomguard_env_leaks():
    """A test that sets an ``OOMGUARD_*`` variable in this worker's own environment (an in-process recipe
    run) must not hand it to every later test's children: put them back as they were."""
    before = {k: v for k, v in os.environ.items() if k.startswith("OOMGUARD_")}
    yield
    for k in [k for k in os.environ if k.startswith("OOMGUARD_") and k not in before]:
        del os.environ[k]
    os.environ.update(before)
