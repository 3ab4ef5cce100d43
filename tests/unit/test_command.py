"""The command editor: edits only, in the user's style, each checked against the real parser."""

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomguard.supervisor.command import (
    build_command,
    flags_in_command,
    knobs_in_command,
    output_dir_of,
    read_flag,
    world_size_of,
)

FLAG, IN, PH = "flag", "in_process", "placeholder"
HF_BASE = ["--output_dir", "x", "--use_cpu", "True"]  # use_cpu: bf16/fp16 need no GPU while parsing


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(transformers.TrainingArguments)

    def parse(argv):
        args, rest = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
        assert rest == []
        return args
    return parse


@pytest.fixture(scope="module")
def trl_parse():
    trl = pytest.importorskip("trl")
    parser = trl.TrlParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig))
    return lambda argv: parser.parse_args_and_config(args=["--dataset_name", "d", *argv])


def test_hf_value_flags_keep_each_style_and_every_occurrence(hf):
    argv = [*HF_BASE, "--per_device_train_batch_size=8", "--gradient-accumulation-steps", "2",
            "--learning_rate", "2e-4", "--per_device_train_batch_size", "8", "--warmup_steps", "10"]
    orders = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4.0, "learning_rate": 5e-5,
              "warmup_steps": 5.0}  # warmup_steps: not in the registry, the generic --warmup_steps
    built = build_command(argv, orders)
    assert built.argv == (*HF_BASE, "--per_device_train_batch_size=4", "--gradient-accumulation-steps", "4",
                          "--learning_rate", "5e-05", "--per_device_train_batch_size", "4", "--warmup_steps", "5")
    assert built.delivered == dict.fromkeys(orders, FLAG)
    args = hf(built.argv)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate,
            args.warmup_steps) == (4, 4, 5e-5, 5)


@pytest.mark.parametrize("flags, want, edited, delivered, parsed", [
    (["--bf16", "True", "--fp16", "False"], "fp16", ["--bf16", "False", "--fp16", "True"], FLAG, (False, True)),
    (["--bf16=true", "--fp16=false"], "fp32", ["--bf16=false", "--fp16=false"], FLAG, (False, False)),
    (["--bf16", "1", "--fp16", "0"], "fp16", ["--bf16", "0", "--fp16", "1"], FLAG, (False, True)),
    (["--bf16", "TRUE", "--fp16", "no"], "fp16", ["--bf16", "FALSE", "--fp16", "yes"], FLAG, (False, True)),
    (["--bf16=False"], "fp32", ["--bf16=False"], IN, (False, False)),  # kept explicit; fp16 unstated
    (["--bf16", "True"], "fp16", ["--bf16", "False"], IN, (False, False)),  # --fp16 absent: never appended
    (["--bf16"], "fp16", ["--bf16"], IN, (True, False)),  # bare cannot become false
    (["--fp16", "--bf16", "false"], "bf16", ["--fp16", "--bf16", "false"], IN, (False, True)),  # no both-on
    (["--fp16", "--bf16", "false"], "fp16", ["--fp16", "--bf16", "false"], FLAG, (False, True)),
])
def test_hf_precision_styles(hf, flags, want, edited, delivered, parsed):
    built = build_command([*HF_BASE, *flags], {"precision": want})
    assert built.argv == (*HF_BASE, *edited) and built.delivered == {"precision": delivered}
    args = hf(built.argv)
    assert (args.bf16, args.fp16) == parsed


def test_trl_bool_flags_stay_valued_because_bare_bf16_is_an_error_there(trl_parse):
    with pytest.raises(SystemExit):  # the old editor's output: TRL 1.16 wants a value after --bf16
        trl_parse([*HF_BASE, "--bf16"])
    argv = [*HF_BASE, "--bf16", "False", "--fp16", "True", "--max_length=2048", "--lora_r", "16"]
    built = build_command(argv, {"precision": "bf16", "max_seq_length": 1024, "lora_r": 8})
    assert built.argv == (*HF_BASE, "--bf16", "True", "--fp16", "False", "--max_length=1024", "--lora_r", "8")
    assert set(built.delivered.values()) == {FLAG}
    _, cfg, model = trl_parse(built.argv)
    assert (cfg.bf16, cfg.fp16, cfg.max_length, model.lora_r) == (True, False, 1024, 8)
    built = build_command([*HF_BASE, "--bf16=true"], {"precision": "fp32"})
    assert built.argv[-1] == "--bf16=false" and built.delivered == {"precision": IN}
    assert trl_parse(built.argv)[1].bf16 is False


def test_argparse_with_its_own_names():
    parser = argparse.ArgumentParser()
    for name, kind in (("--block_size", int), ("--micro_batch_size", int), ("--lora_rank", int), ("--lr", float),
                       ("--warmup_steps", int), ("--max_grad_norm", float), ("--run_name", str)):
        parser.add_argument(name, type=kind)
    argv = ["--block_size", "2048", "--micro_batch_size=8", "--lora_rank", "16", "--lr", "3e-4",
            "--warmup_steps", "100", "--max_grad_norm", "-1", "--run_name=--lr"]
    assert knobs_in_command(argv, ["warmup_steps"]) == {
        "max_seq_length": 2048, "per_device_train_batch_size": 8, "lora_r": 16, "learning_rate": 3e-4,
        "warmup_steps": 100, "max_grad_norm": -1.0}
    assert flags_in_command(argv, ["warmup_steps"]) == {
        "max_seq_length": "--block_size", "per_device_train_batch_size": "--micro_batch_size",
        "lora_r": "--lora_rank", "learning_rate": "--lr", "warmup_steps": "--warmup_steps",
        "max_grad_norm": "--max_grad_norm"}
    orders = {"max_seq_length": 1024, "per_device_train_batch_size": 4, "lora_r": 8, "learning_rate": 1.5e-4,
              "warmup_steps": 50.0, "max_grad_norm": 0.5}
    built = build_command(argv, orders)
    assert built.argv[2] == "--micro_batch_size=4" and built.argv[-1] == "--run_name=--lr"
    ns = parser.parse_args(built.argv)
    assert (ns.block_size, ns.micro_batch_size, ns.lora_rank, ns.lr, ns.warmup_steps, ns.max_grad_norm,
            ns.run_name) == (1024, 4, 8, 1.5e-4, 50, 0.5, "--lr")


def test_click_dash_options():
    click = pytest.importorskip("click")

    @click.command()
    @click.option("--max-length", type=int, default=512)
    @click.option("--lr", type=float, default=1e-3)
    @click.option("--bf16/--no-bf16", default=True)
    def train(max_length, lr, bf16):
        return max_length, lr, bf16

    argv = ["--max-length", "512", "--no-bf16", "--lr=0.001"]
    assert knobs_in_command(argv) == {"max_seq_length": 512, "learning_rate": 0.001}  # fp16 unstated
    built = build_command(argv, {"max_seq_length": 256, "learning_rate": 5e-4, "precision": "bf16"})
    assert built.argv == ("--max-length", "256", "--no-bf16", "--lr=0.0005")
    assert built.delivered == {"max_seq_length": FLAG, "learning_rate": FLAG, "precision": IN}
    assert train.main(args=list(built.argv), standalone_mode=False) == (256, 5e-4, False)


def test_typer_dash_options():
    typer = pytest.importorskip("typer")
    app, seen = typer.Typer(), {}

    @app.command()
    def train(max_length: int = 512, bf16: bool = False):
        seen.update(max_length=max_length, bf16=bf16)

    built = build_command(["--max-length=1024", "--bf16"], {"max_seq_length": 512, "precision": "fp16"})
    assert built.argv == ("--max-length=512", "--bf16") and built.delivered == {"max_seq_length": FLAG,
                                                                               "precision": IN}
    typer.main.get_command(app).main(args=list(built.argv), standalone_mode=False)
    assert seen == {"max_length": 512, "bf16": True}


def test_hf_resume_edited_in_place_never_appended(hf):
    argv = [*HF_BASE, "--resume-from-checkpoint=/c/checkpoint-2"]
    built = build_command(argv, {}, resume_from="/c/checkpoint-4")
    assert built.argv[-1] == "--resume-from-checkpoint=/c/checkpoint-4"
    assert built.delivered == {"resume_from_checkpoint": FLAG}
    assert hf(built.argv).resume_from_checkpoint == "/c/checkpoint-4"
    built = build_command(["a", "--resume_from_checkpoint", "old"], {}, resume_from="/c/checkpoint-4")
    assert built.argv == ("a", "--resume_from_checkpoint", "/c/checkpoint-4")
    built = build_command(["a", "b"], {}, resume_from="/c/checkpoint-4")
    assert built.argv == ("a", "b") and built.delivered == {"resume_from_checkpoint": IN}


def test_both_spellings_are_edited_and_reported():
    argv = ["t.py", "--max_seq_length", "4096", "--block-size=4096"]
    built = build_command(argv, {"max_seq_length": 2048})
    assert built.argv == ("t.py", "--max_seq_length", "2048", "--block-size=2048")
    assert flags_in_command(argv)["max_seq_length"] == "--block-size"  # the last one: the one argparse keeps


def test_flag_without_value_is_not_editable():
    argv = ["t.py", "--max_length", "--bf16", "--lr", "--x", "1"]
    assert flags_in_command(argv) == {} and knobs_in_command(argv) == {"precision": "bf16"}
    built = build_command(argv, {"max_seq_length": 8, "learning_rate": 1e-4, "precision": "bf16"})
    assert built.argv == tuple(argv)
    assert built.delivered == {"max_seq_length": IN, "learning_rate": IN, "precision": IN}


@pytest.mark.parametrize("flags, precision", [
    (["--no_bf16", "--fp16", "False"], "fp32"), (["--no-bf16"], None), (["--no_bf16", "--fp16"], "fp16"),
    (["--bf16=False", "--fp16=false"], "fp32"), (["--bf16", "True"], "bf16"), (["--bf16", "--bf16", "0"], None),
    (["--precision", "fp16", "--bf16", "1"], "fp16"), (["--bf16=maybe"], None), ([], None),
])
def test_knobs_in_command_reads_precision_in_any_style(flags, precision):
    assert knobs_in_command(["t.py", *flags]).get("precision") == precision


def test_precision_value_flag_and_what_flags_in_command_lists():
    argv = ["python", "-m", "oomguard.recipes.sft", "--precision", "fp16"]
    built = build_command(argv, {"precision": "bf16"})
    assert built.argv[-2:] == ("--precision", "bf16") and built.delivered == {"precision": FLAG}
    assert flags_in_command(argv) == {"precision": "--precision"}
    assert flags_in_command(["t", "--fp16", "False", "--bf16", "True"]) == {"precision": "--fp16"}
    assert "precision" not in flags_in_command(["t", "--bf16", "True"])  # fp16 could not be stated
    lightning = ["t", "--precision", "bf16-mixed"]  # not our vocabulary: left alone
    assert build_command(lightning, {"precision": "fp16"}).argv == tuple(lightning)


def test_policy_knobs_and_extra_spellings():
    argv = ["t.py", "--ctx", "512", "--weight_decay=0.1"]
    extra = {"max_seq_length": ["--ctx"]}
    assert knobs_in_command(argv, ["weight_decay"], extra) == {"max_seq_length": 512, "weight_decay": 0.1}
    assert flags_in_command(argv, ["weight_decay"], extra) == {"max_seq_length": "--ctx",
                                                               "weight_decay": "--weight_decay"}
    built = build_command(argv, {"max_seq_length": 256, "weight_decay": 0.0}, extra)
    assert built.argv == ("t.py", "--ctx", "256", "--weight_decay=0")


def test_placeholders_are_filled_and_unknown_ones_kept():
    built = build_command(["run.sh", "--seq={max_seq_length}", "{nope}"], {"max_seq_length": 256})
    assert built.argv == ("run.sh", "--seq=256", "{nope}") and built.delivered == {"max_seq_length": PH}
    assert "max_seq_length" not in knobs_in_command(["t", "--max_length", "{max_seq_length}"])


def test_world_size_and_output_dir():
    assert world_size_of(["torchrun", "--nproc_per_node", "2", "t.py"]) == 2
    assert world_size_of(["accelerate", "launch", "--num_processes=4", "--num_machines", "2", "t.py"]) == 4
    assert world_size_of(["python", "t.py"]) == 1
    assert output_dir_of(["x", "--output_dir", "/o"]) == "/o" and read_flag(["--flag"], ["--flag"]) == "true"


_TOKENS = st.one_of(
    st.sampled_from(["--bf16", "--fp16", "--no_bf16", "True", "false", "1", "0", "--lr", "--max_length",
                     "--max-length=8", "--bf16=true", "--precision", "fp16", "-1", "-x", "--", "{lora_r}", "="]),
    st.text(max_size=8))


@settings(max_examples=200, deadline=None)
@given(st.lists(_TOKENS, max_size=12))
def test_no_orders_returns_the_command_byte_for_byte(argv):
    assert build_command(argv, {}).argv == tuple(argv)


@settings(max_examples=200, deadline=None)
@given(st.lists(_TOKENS, max_size=12), st.sampled_from(["bf16", "fp16", "fp32"]))
def test_orders_only_touch_their_flag_values(argv, precision):
    built = build_command(argv, {"learning_rate": 0.5, "max_seq_length": 8, "precision": precision})
    assert len(built.argv) == len(argv)
    for i, (old, new) in enumerate(zip(argv, built.argv)):
        if old != new:  # either ``--flag=value`` or the token right after a knob flag
            flags = {old.partition("=")[0], argv[i - 1] if i else ""}
            assert flags & {"--lr", "--max_length", "--max-length", "--bf16", "--fp16", "--precision"}, (old, new)
