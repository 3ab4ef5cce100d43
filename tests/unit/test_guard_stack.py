"""The child's stack against the tested range, and the parts that adapt to an older stack (issue 16)."""

import json
import types

import numpy as np
import pytest
import torch

from oomguard.guard import stack
from oomguard.guard import trainer_patches as internals
from oomguard.guard.env import GuardEnv
from oomguard.guard.resume import prepare

TESTED = {"transformers": ("4.57", "5.24"), "trl": ("0.24", "1.16")}
FLOOR = {"transformers": "4.46"}


def test_versions_inside_the_tested_range_say_nothing():
    assert stack.outside_range({"transformers": "5.17.0", "trl": "0.24.0", "numpy": "2.4"}, TESTED, FLOOR) == []
    assert stack.outside_range({"transformers": "4.57.6+local", "trl": "1.16.0rc1"}, TESTED, FLOOR) == []


def test_older_newer_and_below_the_floor_are_each_said():
    lines = stack.outside_range({"transformers": "4.40.2", "trl": "0.12.2"}, TESTED, FLOOR)
    assert lines[0].startswith("transformers 4.40.2 is below oomguard's floor 4.46: unsupported")
    assert lines[1] == "trl 0.12.2 is older than the tested 0.24-1.16"
    assert stack.outside_range({"transformers": "6.0.0"}, TESTED, FLOOR) == [
        "transformers 6.0.0 is newer than the tested 4.57-5.24"]
    assert stack.outside_range({"transformers": "4.50.0"}, TESTED, FLOOR) == [
        "transformers 4.50.0 is older than the tested 4.57-5.24"]


def test_this_stack_is_a_tested_one_and_the_event_says_so(tmp_path):
    import transformers  # noqa: F401  (the internals' owners must be loaded to be checked)

    check = stack.check_stack()
    assert check.versions["transformers"] == transformers.__version__
    assert check.missing == [] and check.tested, check.summary()
    journal = prepare.EventWriter(tmp_path, 0)
    stack.journal_stack(journal, attempt=2, rank=0)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["guard_stack"]
    assert events[0]["tested"] is True and events[0]["attempt"] == 2 and events[0]["degraded"] == []


def test_a_missing_internal_names_the_guard_part_it_costs(monkeypatch):
    gone = internals.Internal("transformers.trainer:Trainer", "_gone_in_this_version", internals.Use.WRAPS,
                              ("self",), "guard.resume.packed", "re-packed rows only")
    monkeypatch.setattr(internals, "INTERNALS", (*internals.INTERNALS, gone))
    check = stack.check_stack()
    assert not check.tested
    assert check.degraded == ["guard.resume.packed: re-packed rows only"]
    assert "without those internals: guard.resume.packed: re-packed rows only" in check.summary()


def test_only_packages_already_imported_are_checked():
    never = internals.Internal("no_such_package_oomguard.mod:Thing", "x", internals.Use.READS, None, "nowhere", "t")
    assert internals.missing_loaded((never,)) == []
    assert internals.missing((never,)) != []


# --- the adaptations -------------------------------------------------------------------------------
class _Args:
    def __init__(self, train_batch_size, auto_find_batch_size=False):
        self.train_batch_size, self.auto_find_batch_size = train_batch_size, auto_find_batch_size


class _Trainer:
    """The shape of transformers < 5.2: train() passes the checkpoint's batch to the inner loop."""

    def __init__(self, args):
        self.args, self.seen = args, None

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None):
        self.seen = batch_size

    def train(self, checkpoint_batch):
        import functools

        functools.partial(self._inner_training_loop, batch_size=checkpoint_batch)(args=self.args)


def test_a_resume_trains_at_the_args_batch_not_the_checkpoints():
    trainer = _Trainer(_Args(train_batch_size=2))
    internals.keep_args_batch_size(trainer)
    trainer.train(checkpoint_batch=4)
    assert trainer.seen == 2


def test_auto_find_batch_size_keeps_hfs_own_choice():
    trainer = _Trainer(_Args(train_batch_size=2, auto_find_batch_size=True))
    internals.keep_args_batch_size(trainer)
    trainer.train(checkpoint_batch=4)
    assert trainer.seen == 4


def test_numpy_rng_state_loads_on_an_older_transformers(tmp_path, monkeypatch):
    rng = tmp_path / "rng_state.pth"
    torch.save({"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, rng)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(rng)  # what transformers 4.46 does on torch >= 2.6

    class Old:
        def _load_rng_state(self, checkpoint):
            return torch.load(checkpoint)

    old_module = types.ModuleType("transformers.trainer")  # no safe_globals(): before transformers 4.47
    monkeypatch.setitem(__import__("sys").modules, "transformers.trainer", old_module)
    trainer = Old()
    assert internals.allow_numpy_rng_state(trainer) is True
    state = trainer._load_rng_state(rng)
    assert state["numpy"][0] == "MT19937"


def test_a_current_transformers_needs_no_rng_wrap():
    import transformers.trainer  # noqa: F401

    class New:
        def _load_rng_state(self, checkpoint):
            raise AssertionError("not called")

    trainer = New()
    assert internals.allow_numpy_rng_state(trainer) is False
    assert "_load_rng_state" not in vars(trainer)


def test_oomguards_own_failure_placing_the_data_degrades_instead_of_failing_the_resume(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'Dataset' object has no attribute 'shuffle_dataset'")

    monkeypatch.setattr(prepare, "ledger_of", lambda trainer: object())
    monkeypatch.setattr(prepare, "apply_packed_position", broken)
    env = GuardEnv(run_dir=tmp_path, attempt=2)
    with pytest.warns(RuntimeWarning, match="exact resume position failed"):
        prepare._place_data(object(), tmp_path / "checkpoint-2", env, prepare.EventWriter(tmp_path, 0))
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["part"]) for e in events] == [("guard_degraded", "exact resume position")]
    assert "AttributeError" in events[0]["error"]


def test_an_oom_placing_the_data_is_still_an_oom(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prepare, "ledger_of", lambda trainer: object())
    monkeypatch.setattr(prepare, "apply_packed_position", oom)
    with pytest.raises(torch.OutOfMemoryError):
        prepare._place_data(object(), tmp_path / "c", GuardEnv(run_dir=tmp_path), prepare.EventWriter(tmp_path, 0))


def test_an_attribute_of_a_class_made_at_run_time_is_found_in_its_bases():
    class Base:
        def method(self):
            return self.padding_free_flag_oomguard_test

    Made = type("Made", (Base,), {})  # no source of its own, like Unsloth's compiled SFTTrainer
    item = internals.Internal(f"{__name__}:Made", "padding_free_flag_oomguard_test", internals.Use.READS, None,
                              "guard.resume.ledger", "t")
    globals()["Made"] = Made
    try:
        assert internals.missing((item,)) == []
    finally:
        del globals()["Made"]


def test_major_minor_take_leading_digits_only():
    assert internals.minor_version("4.57.6+cu124") == (4, 57)
    assert internals.minor_version("2.6.0.dev20241112") == (2, 6)
    assert internals.minor_version("5.0rc1") == (5, 0)  # not 5.01: a pre-release suffix is no digit of the minor


def test_a_failed_guard_installation_trains_unguarded_and_says_so(monkeypatch, capsys):
    from oomguard.guard import train

    def broken(trainer, env):
        raise AttributeError("'Trainer' object has no attribute 'callback_handler'")

    monkeypatch.setattr(train, "install_guard", broken)
    ran = []
    out = train.guarded_train(object(), env=GuardEnv(), resume_from_checkpoint=False,
                              train_fn=lambda resume_from_checkpoint: ran.append(resume_from_checkpoint) or "trained")
    assert out == "trained" and ran == [None]
    assert "the guard's installation failed (AttributeError" in capsys.readouterr().err
