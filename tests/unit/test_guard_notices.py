"""The guard's own warnings: say oomguard, point at oomguard's line (not transformers'), once per run."""

import warnings

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from oomguard import protocol
from oomguard.guard import notices
from oomguard.guard.callbacks.monitor import MemoryMonitorCallback
from oomguard.guard.notices import OomguardWarning, warn_once


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(notices, "_warned", set())


def test_once_per_process_and_named_oomguard():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert warn_once("k", "something is off", environ={})
        assert not warn_once("k", "something is off", environ={})
    [w] = seen
    assert issubclass(w.category, OomguardWarning) and issubclass(w.category, RuntimeWarning)
    assert str(w.message) == "oomguard: something is off"
    assert w.filename == __file__  # stacklevel 1: the line that called warn_once


def test_once_per_run_across_attempts(tmp_path, monkeypatch):
    environ = {protocol.ENV_RUN_DIR: str(tmp_path)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert warn_once("no_cuda:x", "oomguard: x needs CUDA", environ=environ)
        monkeypatch.setattr(notices, "_warned", set())  # the next attempt is a fresh process
        assert not warn_once("no_cuda:x", "oomguard: x needs CUDA", environ=environ)
        assert warn_once("no_cuda:y", "oomguard: y needs CUDA", environ=environ)
    assert [str(w.message) for w in seen] == ["oomguard: x needs CUDA", "oomguard: y needs CUDA"]
    assert (tmp_path / notices.WARNED_FILE).read_text().splitlines() == ["no_cuda:x", "no_cuda:y"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA warning needs a machine without CUDA")
def test_a_callbacks_no_cuda_warning_points_at_oomguard_not_the_dispatcher(tmp_path, monkeypatch):
    monkeypatch.delenv(protocol.ENV_RUN_DIR, raising=False)
    handler = CallbackHandler([MemoryMonitorCallback()], None, None, None, None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        handler.on_train_begin(args, TrainerState(), TrainerControl())
    [w] = [w for w in seen if issubclass(w.category, OomguardWarning)]
    assert w.filename.endswith("oomguard/guard/callbacks/monitor.py"), w.filename
    assert str(w.message).startswith("oomguard: memory monitor")
