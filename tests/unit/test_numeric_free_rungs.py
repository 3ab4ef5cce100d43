"""Issue 18 item 6: the registry entries, policy checks, allocator env and in-child readers of the free rungs."""

from __future__ import annotations

import pytest
import yaml

from oomguard import knobs as K
from oomguard.policy import parse_policy
from oomguard.supervisor.alloc_env import DEFAULT_CONF, alloc_env, merge_option

BASE = """
name: t
knobs: {max_seq_length: 64, per_device_train_batch_size: 4, gradient_accumulation_steps: 1, lora_r: 8,
        lora_alpha: 16, precision: fp32, gradient_checkpointing: false, optim: adamw_torch,
        expandable_segments: false}
ladders:
  cuda_oom:
    rungs:
"""


def _problems(rung: str) -> str:
    try:
        parse_policy(yaml.safe_load(BASE + f"      - {rung}\n"))
    except Exception as exc:  # noqa: BLE001 - the loader's error lists every problem
        return str(exc)
    return ""


def test_optimizer_names_match_the_installed_transformers():
    from transformers.training_args import OptimizerNames

    assert set(K.OPTIMIZER_NAMES) == {o.value for o in OptimizerNames}


def test_registry_entries_and_coercion():
    assert K.spec(K.GRADIENT_CHECKPOINTING).fields == ("activation_checkpointing", "gradient_checkpointing")
    assert K.spec(K.OPTIM).resume is K.Resume.NUMERIC and K.spec(K.GRADIENT_CHECKPOINTING).resume is K.Resume.SAFE
    assert K.spec(K.EXPANDABLE_SEGMENTS).deliveries == (K.Delivery.ENV,) and K.ENV_KNOBS == (K.EXPANDABLE_SEGMENTS,)
    assert K.Delivery.ENV not in K.spec(K.BATCH).deliveries
    assert K.coerce(K.GRADIENT_CHECKPOINTING, "False") is False and K.coerce(K.OPTIM, "sgd") == "sgd"
    assert "paged_adamw_8bit" in K.value_problem(K.OPTIM, "paged_adam_8bit")


@pytest.mark.parametrize("rung", [
    "{knob: gradient_checkpointing, op: set, value: true, resume: safe}",
    "{knob: optim, op: set, value: paged_adamw_8bit, resume: numeric}",
    "{knob: expandable_segments, op: set, value: true, resume: safe}",
])
def test_free_rungs_validate(rung):
    assert _problems(rung) == ""


@pytest.mark.parametrize("rung, words", [
    ("{knob: optim, op: set, value: paged_adam_8bit, resume: numeric}", "not a optim transformers knows"),
    ("{knob: optim, op: set, value: paged_adamw_8bit, resume: safe}", "expected resume: numeric"),
    ("{knob: gradient_checkpointing, op: set, value: 1, resume: safe}", "true or false"),
    ("{knob: gradient_checkpointing, op: scale, factor: 0.5, resume: safe}", "takes op set"),
    ("{knob: gradient_checkpointing, op: set, value: false, resume: safe}", "never help"),
])
def test_bad_free_rungs_say_what_and_the_fix(rung, words):
    assert words in _problems(rung)


def test_alloc_env_default_merge_and_turn_over():
    assert alloc_env({}, {}).updates == {"PYTORCH_CUDA_ALLOC_CONF": DEFAULT_CONF}
    assert alloc_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {}).updates == {}  # Trust rule 1
    merged = alloc_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {K.EXPANDABLE_SEGMENTS: True})
    assert merged.updates == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}
    over = alloc_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False,garbage_collection_threshold:0.6"},
                     {K.EXPANDABLE_SEGMENTS: True})
    assert over.updates["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6,expandable_segments:True"
    assert "expandable_segments:False" in over.note and "kept" in over.note
    first = alloc_env({"PYTORCH_ALLOC_CONF": "", "PYTORCH_CUDA_ALLOC_CONF": "x:1"}, {K.EXPANDABLE_SEGMENTS: True})
    assert first.updates == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # the one torch reads first
    assert merge_option("a:1,expandable_segments:True", "expandable_segments", "False") == \
        ("a:1,expandable_segments:False", "True")


def test_the_child_env_says_when_it_changes_the_users_allocator_config(tmp_path, monkeypatch, capsys):
    from _loop_fakes import make_spec

    from oomguard.protocol import ResumeMode
    from oomguard.protocol.run_record import AttemptRecord, RunRecord, RunStatus
    from oomguard.supervisor.attempt import child_env
    from oomguard.supervisor.journal import Journal

    spec = make_spec(tmp_path)
    spec.run_dir.mkdir(parents=True)
    journal = Journal(spec.run_dir, RunRecord(RunStatus.RUNNING, list(spec.command), "fast", "", {}, {}, ""))
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False,max_split_size_mb:128")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    plain = AttemptRecord(1, 0.0, {}, command=list(spec.command))
    assert child_env(spec, journal, plain, ResumeMode.NORMAL)["PYTORCH_CUDA_ALLOC_CONF"] == \
        "expandable_segments:False,max_split_size_mb:128"  # Trust rule 1: as written, nothing to say
    assert "allocator" not in capsys.readouterr().err
    ordered = AttemptRecord(2, 0.0, {}, command=list(spec.command), orders={K.EXPANDABLE_SEGMENTS: True})
    env = child_env(spec, journal, ordered, ResumeMode.NORMAL)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128,expandable_segments:True"
    [line] = [line for line in capsys.readouterr().err.splitlines() if "allocator" in line]
    assert "attempt 2: allocator: the user's PYTORCH_CUDA_ALLOC_CONF=" in line and "expandable_segments:False" in line


def test_free_rung_readers():
    from oomguard.guard import free_rungs as F

    assert F.expandable_in("max_split_size_mb:64,expandable_segments:True") is True
    assert F.expandable_in("") is False
    assert F.alloc_conf_in_env({"PYTORCH_ALLOC_CONF": "a:1", "PYTORCH_CUDA_ALLOC_CONF": "b:2"}) == \
        ("PYTORCH_ALLOC_CONF", "a:1")
    bnb8 = {"module": "bitsandbytes.optim.adamw", "class": "AdamW", "bits": 8, "paged": True}
    assert F.optimizer_matches("paged_adamw_8bit", bnb8) is True
    assert F.optimizer_matches("paged_adamw_8bit", {**bnb8, "class": "PagedAdamW8bit"}) is True
    assert F.optimizer_matches("paged_adamw_32bit", bnb8) is False and F.optimizer_matches("adafactor", bnb8) is None
    assert F.optimizer_matches("adamw_torch", {"module": "torch.optim.adamw", "class": "AdamW"}) is True


def test_bootstrap_sets_both_checkpointing_fields_and_the_optim_enum():
    from transformers import TrainingArguments

    from oomguard.bootstrap import knobs as B

    args = TrainingArguments("/tmp/x", use_cpu=True, report_to="none")
    changes, skipped = B.plan(args, {K.GRADIENT_CHECKPOINTING: True, K.OPTIM: "paged_adamw_8bit",
                                     K.EXPANDABLE_SEGMENTS: True})
    B.apply(args, changes)
    assert skipped == [] and args.gradient_checkpointing is True
    assert getattr(args, "activation_checkpointing", True) is True
    assert type(args.optim).__name__ == "OptimizerNames" and args.optim.value == "paged_adamw_8bit"


def test_a_foreign_optimizer_state_is_found_and_reset():
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    from oomguard.guard import free_rungs as F

    p = torch.nn.Parameter(torch.randn(64, 128))
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    torch_opt.step()
    opt = bnb.optim.AdamW([p], optim_bits=8)
    opt.load_state_dict(torch_opt.state_dict())
    assert "exp_avg" in F.foreign_state(opt)
    said = F.reset_foreign_state(opt)
    assert "reset" in said and not opt.state and F.foreign_state(opt) is None
    opt.step()  # a fresh 8-bit state: no KeyError 'state1'
    assert opt.state[p]["state1"].dtype == torch.uint8


def test_live_checkpointing_and_offload_are_read_from_the_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from oomguard.guard import free_rungs as F

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert F.layers_checkpointing(model) == (False, False)
    model.gradient_checkpointing_enable()
    assert F.layers_checkpointing(model) == (True, False)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        pytest.skip("this transformers has no activation_checkpointing_enable(offload=)")
    enable(offload=True)
    assert F.layers_checkpointing(model) == (True, True)


def test_command_edits_a_valued_bool_flag_in_its_own_spelling_and_never_a_bare_one():
    from oomguard.supervisor.command import build_command

    built = build_command(["t.py", "--gradient_checkpointing", "false", "--optim", "adamw_torch"],
                          {K.GRADIENT_CHECKPOINTING: True, K.OPTIM: "paged_adamw_8bit"})
    assert built.argv == ("t.py", "--gradient_checkpointing", "true", "--optim", "paged_adamw_8bit")
    assert built.delivered == {K.GRADIENT_CHECKPOINTING: "flag", K.OPTIM: "flag"}
    bare = build_command(["t.py", "--gradient_checkpointing", "--bf16"], {K.GRADIENT_CHECKPOINTING: False})
    assert bare.argv == ("t.py", "--gradient_checkpointing", "--bf16") and bare.delivered == {
        K.GRADIENT_CHECKPOINTING: "in_process"}
