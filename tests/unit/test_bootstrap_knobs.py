"""Knobs onto arguments and LoRA configs, resume choice, switches (pure parts of oomguard.bootstrap)."""

import dataclasses

import pytest

from oomguard.bootstrap import knobs as knob_map
from oomguard.bootstrap.injection import is_launcher
from oomguard.bootstrap.knobs import Via
from oomguard.bootstrap.lora import apply_lora
from oomguard.bootstrap.switches import Part, Switches, parse_skip
from oomguard.bootstrap.trainer import choose_resume


@dataclasses.dataclass
class NewArgs:  # TRL >= 0.20 spelling (SFTConfig)
    max_length: int = 1024
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    bf16: bool = True
    fp16: bool = False
    learning_rate: float = 2e-4
    auto_find_batch_size: bool = False
    mixed_precision: str = "bf16"


@dataclasses.dataclass
class OldArgs:  # TRL < 0.20 spelling
    max_seq_length: int = 2048
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4


def test_new_spelling_changes_and_paths():
    args = NewArgs()
    knobs = {"max_seq_length": 512, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
             "precision": "fp32", "learning_rate": 1e-4}
    changes, skipped = knob_map.plan(args, knobs, {"per_device_train_batch_size": "flag",
                                                   "gradient_accumulation_steps": "flag"})
    by_field = {c.field: c for c in changes}
    assert (by_field["max_length"].old, by_field["max_length"].new, by_field["max_length"].via) == (1024, 512, Via.IN_PROCESS)
    assert by_field["gradient_accumulation_steps"].via == Via.FLAG  # equal, and the command carried it
    assert by_field["learning_rate"].new == 1e-4 and not skipped
    knob_map.apply(args, changes)
    assert (args.max_length, args.per_device_train_batch_size, args.bf16, args.fp16) == (512, 4, False, False)
    assert args.mixed_precision == "no"


def test_old_spelling_and_missing_fields_are_reported():
    args = OldArgs()
    changes, skipped = knob_map.plan(args, {"max_seq_length": 256, "precision": "bf16", "warmup_steps": 3,
                                            "lora_r": 4})
    assert [(c.field, c.new) for c in changes] == [("max_seq_length", 256)]
    assert {s.knob for s in skipped} == {"precision", "warmup_steps"}  # lora_r belongs to the PEFT config
    assert all("no" in s.why for s in skipped)


def test_equal_value_without_a_flag_is_unchanged():
    changes, _ = knob_map.plan(NewArgs(), {"per_device_train_batch_size": 8})
    assert changes[0].via == Via.UNCHANGED and changes[0].to_dict()["via"] == "unchanged"


def test_fp16_is_not_forced_without_cuda():
    args = NewArgs()
    changes, skipped = knob_map.plan(args, {"precision": "fp16"}, cuda=False)
    assert not changes and "CUDA" in skipped[0].why
    changes, _ = knob_map.plan(args, {"precision": "fp16"}, cuda=True)
    knob_map.apply(args, changes)
    assert (args.bf16, args.fp16, args.mixed_precision) == (False, True, "fp16")


def test_auto_find_batch_size_forced_off_reports_only_when_on():
    on, off = NewArgs(auto_find_batch_size=True), NewArgs()
    assert knob_map.force_off_auto_find_batch_size(on) is True and on.auto_find_batch_size is False
    assert knob_map.force_off_auto_find_batch_size(off) is False


@dataclasses.dataclass
class FakeLora:
    r: int = 16
    lora_alpha: int = 32


def test_lora_knobs_onto_config_with_path():
    config = FakeLora()
    done = apply_lora(config, {"lora_r": 4, "lora_alpha": 8, "per_device_train_batch_size": 2}, {})
    assert (config.r, config.lora_alpha) == (4, 8)
    assert done["via"] == "in_process" and done["r"] == {"old": 16, "new": 4}
    assert apply_lora(FakeLora(4, 8), {"lora_r": 4, "lora_alpha": 8}, {"lora_r": "flag"})["via"] == "flag"
    assert apply_lora(FakeLora(), {"per_device_train_batch_size": 2}, {}) is None


@pytest.mark.parametrize("code, supervisor, attempt, expected", [
    (None, "/ck/checkpoint-2", 2, ("/ck/checkpoint-2", Via.IN_PROCESS)),
    ("/ck/checkpoint-2", "/ck/checkpoint-2", 2, ("/ck/checkpoint-2", Via.FLAG)),
    (True, None, 2, (False, Via.IN_PROCESS)),  # the supervisor chose a fresh start
    (None, None, 2, (False, None)),
    (True, None, 1, (True, None)),  # attempt 1: the script's own choice stands
])
def test_choose_resume(code, supervisor, attempt, expected):
    assert choose_resume(code, supervisor, attempt) == expected


def test_switches_from_env(capsys):
    assert not Switches.from_env({}).patching  # outside oomguard
    on = Switches.from_env({"OOMGUARD_RUN_DIR": "/r", "OOMGUARD_BOOTSTRAP_SKIP": "knobs, Resume ,bogus"})
    assert on.patching and not on.on(Part.KNOBS) and not on.on(Part.RESUME) and on.on(Part.CALLBACKS)
    assert "bogus" in capsys.readouterr().err
    assert not Switches.from_env({"OOMGUARD_RUN_DIR": "/r", "OOMGUARD_BOOTSTRAP": "0"}).on(Part.CALLBACKS)
    assert parse_skip("") == frozenset()


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/accelerate", "launch", "t.py"], True), (["/venv/bin/torchrun"], True),
    (["/venv/lib/python3.11/site-packages/torch/distributed/run.py"], True), (["/venv/bin/trl", "sft"], True),
    (["/venv/lib/python3.11/site-packages/trl/scripts/sft.py"], False), (["train.py"], False), ([], False),
])
def test_launcher_parents_are_recognised(argv, expected):
    assert is_launcher(argv) is expected


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig's own default
def test_only_orders_are_applied_whatever_equals_a_class_default():
    """Trust rule 1: no orders, no change — even where the script's value equals the class default
    (the old "offer" logic read such values as unset and overwrote them)."""
    from trl import SFTConfig

    from oomguard.bootstrap.knobs import plan

    args = SFTConfig(output_dir="/tmp/x", per_device_train_batch_size=8, max_length=1024, bf16=False,
                     use_cpu=True, report_to="none")
    assert plan(args, {}, {}, cuda=False) == ([], [])
    changes, skipped = plan(args, {"per_device_train_batch_size": 4, "max_seq_length": 512}, {}, cuda=False)
    by_field = {c.field: c for c in changes}
    assert (by_field["per_device_train_batch_size"].new, by_field["per_device_train_batch_size"].via) == (4, Via.IN_PROCESS)
    assert by_field["max_length"].new == 512 and skipped == []
