"""Knob delivery by flag rewriting (pure)."""

from oomguard.supervisor.command import (build_command, flag_specs, knobs_in_command, output_dir_of,
                                         read_flag, world_size_of)

SPECS = flag_specs(None)


def test_rewrites_present_flags_both_spellings_and_forms():
    argv = ["trl", "sft", "--per_device_train_batch_size", "8", "--max_length=2048", "--lora_r", "16"]
    built = build_command(argv, {"per_device_train_batch_size": 4, "max_seq_length": 1024, "lora_r": 8}, SPECS)
    assert built.argv == ("trl", "sft", "--per_device_train_batch_size", "4", "--max_length=1024", "--lora_r", "8")
    assert built.delivered == {"per_device_train_batch_size": "flag", "max_seq_length": "flag", "lora_r": "flag"}


def test_absent_flag_goes_by_env_unless_policy_says_append():
    argv = ["python", "train.py"]
    assert build_command(argv, {"gradient_accumulation_steps": 4}, SPECS).delivered == {
        "gradient_accumulation_steps": "env"}
    specs = flag_specs({"gradient_accumulation_steps": {"names": ["--gradient_accumulation_steps"], "append": True}})
    built = build_command(argv, {"gradient_accumulation_steps": 4}, specs)
    assert built.argv[-2:] == ("--gradient_accumulation_steps", "4") and built.delivered[
        "gradient_accumulation_steps"] == "appended"


def test_precision_switch_replaces_bool_flags():
    argv = ["python", "t.py", "--fp16", "--bf16", "false", "--x", "1"]
    built = build_command(argv, {"precision": "bf16"}, SPECS)
    assert built.argv == ("python", "t.py", "--x", "1", "--bf16")
    built = build_command(["python", "t.py", "--bf16"], {"precision": "fp32"}, SPECS)
    assert built.argv == ("python", "t.py")


def test_placeholders_are_filled_and_unknown_ones_kept():
    built = build_command(["run.sh", "--seq={max_seq_length}", "{nope}"], {"max_seq_length": 256}, SPECS)
    assert built.argv == ("run.sh", "--seq=256", "{nope}")
    assert built.delivered["max_seq_length"] == "placeholder"


def test_resume_flag_rewritten_only_when_present():
    assert "--resume_from_checkpoint" not in build_command(["a"], {}, SPECS, resume_from="/c/checkpoint-4").argv
    built = build_command(["a", "--resume_from_checkpoint", "old"], {}, SPECS, resume_from="/c/checkpoint-4")
    assert built.argv == ("a", "--resume_from_checkpoint", "/c/checkpoint-4")


def test_knobs_in_command_reads_request():
    argv = ["x", "--per_device_train_batch_size=2", "--max_seq_length", "4096", "--fp16"]
    assert knobs_in_command(argv, SPECS) == {"per_device_train_batch_size": 2, "max_seq_length": 4096,
                                             "precision": "fp16"}


def test_world_size_and_output_dir():
    assert world_size_of(["torchrun", "--nproc_per_node", "2", "t.py"]) == 2
    # accelerate's --num_processes is the total over all machines (it divides it per machine)
    assert world_size_of(["accelerate", "launch", "--num_processes=4", "--num_machines", "2", "t.py"]) == 4
    assert world_size_of(["python", "t.py"]) == 1
    assert output_dir_of(["x", "--output_dir", "/o"]) == "/o" and read_flag(["--flag"], ["--flag"]) == "true"


def test_precision_value_flag_is_read_and_rewritten():
    argv = ["python", "-m", "oomguard.recipes.sft", "--precision", "fp16"]
    assert knobs_in_command(argv, SPECS)["precision"] == "fp16"
    built = build_command(argv, {"precision": "bf16"}, SPECS)
    assert built.argv[-2:] == ("--precision", "bf16") and built.delivered["precision"] == "flag"
    specs = flag_specs({"precision": {"style": "bool", "values": {"bf16": "--bf16", "fp16": "--fp16"}}})
    assert knobs_in_command(argv, specs)["precision"] == "fp16"  # the policy keeps the default spelling


def test_any_policy_knob_is_read_from_its_hf_style_flag():
    specs = flag_specs(None, knobs=["learning_rate", "max_seq_length"])
    argv = ["python", "t.py", "--learning_rate", "3e-4"]
    assert knobs_in_command(argv, specs) == {"learning_rate": 3e-4}
    assert build_command(argv, {"learning_rate": 1e-4}, specs).argv[-1] == "0.0001"
