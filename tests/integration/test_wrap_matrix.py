"""The acceptance matrix of "faithful wrap": six real command styles under ``oomguard run``.

The promise: attempt 1 under oomguard is the user's command byte for byte and trains exactly what
the command trains alone; only when something fails does oomguard change one knob, and only a
knob the child really has.

The styles (fixtures in ``tests/integration/commands/``, each an ordinary script that knows
nothing of oomguard; CPU, tiny Llama + LoRA, 4 optimizer steps, a checkpoint every 2):

=============  ==================================================================================
hf_flags       ``python hf_script.py --model_path .. --output_dir OUT ...``: HfArgumentParser over
               ScriptArguments + TrainingArguments, plain Trainer + get_peft_model. ``--lora_r`` is
               NOT passed: the script's default 8 (= peft's own default) is what trains.
hf_json        ``python hf_script.py args.json``: the same script, every argument in one JSON file
               (``parser.parse_json_file``, the transformers-examples form), ``output_dir: out``.
trl_flags      ``<venv>/bin/trl sft --model_name_or_path .. --use_peft --lora_r 8 ...``: the real TRL CLI.
trl_config     ``<venv>/bin/trl sft --config sft.yaml``: everything in the YAML, ``output_dir: out``.
argparse       ``python argparse_script.py --block_size 64 --micro_batch_size 4 --grad_accum 1
               --lora_rank 8 --lr 1e-3 --out OUT``: its own flag names; builds TrainingArguments itself.
yamltrain      ``yamltrain config.yaml``: an axolotl-like YAML CLI installed as a console script
               (``#!<python>`` shebang, bin dir on PATH), keys ``micro_batch_size``, ``sequence_len``...
=============  ==================================================================================

Config-file styles run with their file as a relative path from their own work dir (cwd), as a
user types them; the alone run and the wrapped run share that cwd and environment.

The policies' knobs (``policies/matrix*.yaml``) all differ from every fixture's values, so a policy
value leaking into attempt 1 is caught in the child's own saved files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _env import user_env
from _shared import shared_dir
from _wrap_run import BIN, ROOT

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
COMMANDS = HERE / "commands"
POLICY = HERE / "policies" / "matrix.yaml"  # no fault: its knobs must not reach attempt 1
OOM_POLICY = HERE / "policies" / "matrix_oom.yaml"  # cuda_oom: two rungs no child has, then halve_batch
MAX_STEPS = 4
SAVE_STEPS = 2
STYLES = ("hf_flags", "hf_json", "trl_flags", "trl_config", "argparse", "yamltrain")

# What every fixture trains (asserted from the child's own files, never assumed, except here to
# write the commands): batch 4 x accumulation 1, lr 1e-3, LoRA r 8 / alpha 16, 64 tokens.
COMMON_TRAINING = {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "logging_steps": 1,
                   "per_device_train_batch_size": 4, "learning_rate": 1e-3, "use_cpu": True,
                   "report_to": "none", "dataloader_num_workers": 0}


# --- the command styles -----------------------------------------------------------------------


@dataclasses.dataclass
class Style:
    name: str
    command: list[str]
    cwd: Path  # the style's work dir: config files live here, relative paths resolve here
    out: Path  # the command's own output dir (absolute), wherever the command names it
    env: dict[str, str]
    length_flag: int | None  # a sequence-length flag in argv (its value), else None
    trl: bool  # an SFTConfig child: its length is SFTConfig.max_length


def base_env(bin_dir: Path | None = None) -> dict[str, str]:
    """The environment of both the alone run and the wrapped run (as ``_wrap_run``: no OOMGUARD_*)."""
    env = user_env()
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false"})
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def flags(mapping: dict[str, Any]) -> list[str]:
    """``{"a": 1, "use_cpu": True}`` -> ``["--a", "1", "--use_cpu"]``."""
    out: list[str] = []
    for k, v in mapping.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def make_style(name: str, work: Path, model_dir: Path, data_dir: Path) -> Style:
    """Write the style's files into ``work`` (fresh) and return its command."""
    work.mkdir(parents=True)
    py, data = sys.executable, str(data_dir / "train.jsonl")
    if name == "hf_flags":
        out = work / "out"
        cmd = [py, str(COMMANDS / "hf_script.py"), "--model_path", str(model_dir), "--data_path", data,
               "--max_seq_length", "64", "--lora_alpha", "16", "--output_dir", str(out),
               *flags({**COMMON_TRAINING, "gradient_accumulation_steps": 1})]
        return Style(name, cmd, work, out, base_env(), 64, False)
    if name == "hf_json":
        (work / "args.json").write_text(json.dumps({
            "model_path": str(model_dir), "data_path": data, "lora_r": 8, "lora_alpha": 16, "max_seq_length": 64,
            "output_dir": "out", "gradient_accumulation_steps": 1, **COMMON_TRAINING}, indent=2))
        return Style(name, [py, str(COMMANDS / "hf_script.py"), "args.json"], work, work / "out", base_env(),
                     None, False)
    if name == "trl_flags":
        out = work / "out"
        cmd = [str(BIN / "trl"), "sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
               "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--output_dir", str(out), "--max_length", "64",
               *flags(COMMON_TRAINING)]
        return Style(name, cmd, work, out, base_env(), 64, True)
    if name == "trl_config":
        import yaml

        (work / "sft.yaml").write_text(yaml.safe_dump({
            "model_name_or_path": str(model_dir), "dataset_name": str(data_dir), "use_peft": True, "lora_r": 8,
            "lora_alpha": 16, "output_dir": "out", "gradient_accumulation_steps": 1, "max_length": 64,
            **COMMON_TRAINING}, sort_keys=False))
        return Style(name, [str(BIN / "trl"), "sft", "--config", "sft.yaml"], work, work / "out", base_env(),
                     None, True)
    if name == "argparse":
        out = work / "out"
        cmd = [py, str(COMMANDS / "argparse_script.py"), "--model", str(model_dir), "--data", data,
               "--out", str(out), "--block_size", "64", "--micro_batch_size", "4", "--grad_accum", "1",
               "--lora_rank", "8", "--lr", "1e-3", "--max_steps", str(MAX_STEPS), "--save_every", str(SAVE_STEPS)]
        return Style(name, cmd, work, out, base_env(), 64, False)
    if name == "yamltrain":
        import yaml

        bin_dir = work / "bin"
        bin_dir.mkdir()
        exe = bin_dir / "yamltrain"  # "pip install"-ed console script: shebang + the CLI's code
        exe.write_text(f"#!{sys.executable}\n" + (COMMANDS / "yamltrain.py").read_text())
        exe.chmod(0o755)
        (work / "config.yaml").write_text(yaml.safe_dump({
            "base_model": str(model_dir), "datasets": [{"path": data, "type": "chat_template"}],
            "output_dir": "out", "micro_batch_size": 4, "gradient_accumulation_steps": 1, "sequence_len": 64,
            "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "max_steps": MAX_STEPS,
            "save_steps": SAVE_STEPS, "logging_steps": 1}, sort_keys=False))
        return Style(name, ["yamltrain", "config.yaml"], work, work / "out", base_env(bin_dir), None, False)
    raise ValueError(name)


# --- running and reading back ----------------------------------------------------------------


def run_alone(style: Style) -> None:
    """The command by itself: same argv, cwd and environment as under oomguard, no supervisor."""
    proc = subprocess.run(style.command, cwd=style.cwd, env=style.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{style.name} alone failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def run_wrapped(style: Style, run_dir: Path, policy: Path, inject: str | None = None, warm_spare: bool = False) -> dict:
    """``oomguard run --policy P --run-dir D --quiet [--inject I] [--warm-spare] -- COMMAND`` to success; run.json."""
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           *(["--inject", inject] if inject else []), *(["--warm-spare"] if warm_spare else []), "--", *style.command]
    proc = subprocess.run(cmd, cwd=style.cwd, env=style.env, capture_output=True, text=True, timeout=300)
    logs = "".join(f"\n--- {p.relative_to(run_dir)}\n{p.read_text()[-2500:]}"
                   for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    assert proc.returncode == 0, f"{style.name}: oomguard run failed ({proc.returncode}):\n" \
                                 f"{proc.stderr[-3000:]}{logs}"
    return json.loads((run_dir / "run.json").read_text())


def load_args(path: Path):
    import torch

    return torch.load(path, weights_only=False)


def args_fields(args) -> dict[str, Any]:
    """Every field of a saved TrainingArguments/SFTConfig: ``to_dict()`` (all dataclass fields) plus
    the rest of ``vars()`` (private/derived state such as ``_n_gpu``), non-plain values as repr."""
    plain = (int, float, str, bool, type(None), list, dict, tuple)
    fields = args.to_dict()
    fields.update({f"vars.{k}": v if isinstance(v, plain) else repr(v) for k, v in vars(args).items()
                   if k not in fields})
    return fields


@dataclasses.dataclass
class Result:
    """What a finished run left in the command's own output dir."""

    args: Any  # final training_args.bin
    fields: dict[str, Any]
    adapter: dict[str, Any]  # final adapter_config.json
    state: dict[str, Any]  # trainer_state.json of the last checkpoint
    checkpoints: list[str]  # every checkpoint-* dir under the work dir (and run dir), relative to cwd

    @property
    def loss_steps(self) -> list[int]:
        return [e["step"] for e in self.state["log_history"] if "loss" in e]

    @property
    def losses(self) -> list[float]:
        return [e["loss"] for e in self.state["log_history"] if "loss" in e]


def read_result(style: Style, *extra_roots: Path) -> Result:
    out = style.out
    assert (out / "training_args.bin").is_file(), f"{style.name}: no training_args.bin in {out}: " \
                                                  f"{sorted(p.name for p in out.iterdir()) if out.exists() else 'missing'}"
    args = load_args(out / "training_args.bin")
    found = sorted(str(p.relative_to(style.cwd) if p.is_relative_to(style.cwd) else p)
                   for root in (style.cwd, *extra_roots) for p in root.rglob("checkpoint-*") if p.is_dir())
    return Result(args=args, fields=args_fields(args), adapter=adapter_config(out / "adapter_config.json"),
                  state=json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text()),
                  checkpoints=found)


def diff(a: dict, b: dict) -> dict[str, tuple]:
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def adapter_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, its ``target_modules`` as a sorted list: peft keeps them as a set and
    writes it in hash order, which differs between two plain runs of the same command (measured:
    ``['v_proj', 'q_proj']`` then ``['q_proj', 'v_proj']``); the set is what configures the adapter."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


# Fields that legitimately differ between two plain runs of the same command. Measured on these
# fixtures (two alone runs of each style, same cwd/env, compared with args_fields): none differ in
# transformers 5.24 (it has no timestamped logging_dir any more), so nothing is excluded.
VOLATILE_FIELDS: frozenset[str] = frozenset()


# --- shared runs -------------------------------------------------------------------------------
# Each style's three runs (alone, wrapped without a fault, wrapped through an injected OOM) are made once per
# test session (tests/integration/_shared.py): trl_flags' two wrapped runs are also what test_resume_wrapped.py
# (sample-exact resume of a wrapped trl sft) and test_wrap_commands.py (the trl CLI's knob delivery and the warm
# spare) check, each from the child's own files, so those files train no trl sft of their own for it.
# WARM_OOM: the styles whose OOM run starts attempt 2 from the warm spare (the default outside the tests).
WARM_OOM = frozenset({"trl_flags"})


def _inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The default model as a plain model directory and the shipped SFT dataset as a dataset directory."""
    from oomguard.recipes import default

    def make(path: Path) -> None:
        (path / "model_dir").write_text(str(default.ensure_default_model(path / "cache")))
        (path / "data").mkdir()
        shutil.copyfile(default.default_dataset_path(), path / "data" / "train.jsonl")

    path = shared_dir(tmp_path_factory, "matrix-inputs", make)
    return Path((path / "model_dir").read_text()), path / "data"


def shared_alone(tmp_path_factory, name: str) -> tuple[Style, Result]:
    """The style's command run by itself, in its own work dir: ``(style, result)``; the output dir is then
    deleted so the wrapped run (same work dir, same paths) starts from nothing."""
    def make(path: Path) -> None:
        style = make_style(name, path / f"A-{name}", *_inputs(tmp_path_factory))
        run_alone(style)
        result = read_result(style)
        shutil.rmtree(style.out)
        (path / "alone.pkl").write_bytes(pickle.dumps((style, result)))

    return pickle.loads((shared_dir(tmp_path_factory, f"matrix-{name}-alone", make) / "alone.pkl").read_bytes())


def shared_wrapped(tmp_path_factory, name: str) -> tuple[Style, Path]:
    """``oomguard run --policy matrix.yaml -- CMD`` (no fault) in the alone run's work dir: ``(style, run dir)``."""
    style, _ = shared_alone(tmp_path_factory, name)
    path = shared_dir(tmp_path_factory, f"matrix-{name}-wrapped",
                      lambda path: run_wrapped(style, path / "run", POLICY))
    return style, path / "run"


def shared_oom(tmp_path_factory, name: str) -> tuple[Style, Path]:
    """``oomguard run --policy matrix_oom.yaml --inject cuda_oom@step=3 -- CMD``, the style written into a new
    work dir of its own (new paths): ``(style, run dir)``."""
    def make(path: Path) -> None:
        style = make_style(name, path / name, *_inputs(tmp_path_factory))
        (path / "style.pkl").write_bytes(pickle.dumps(style))
        run_wrapped(style, path / "run", OOM_POLICY, inject="cuda_oom@step=3", warm_spare=name in WARM_OOM)

    path = shared_dir(tmp_path_factory, f"matrix-{name}-oom", make)
    return pickle.loads((path / "style.pkl").read_bytes()), path / "run"


def expected_requested(style: Style, r: Result) -> dict[str, Any]:
    """What the child really ran, in knob names, read from its own files only."""
    from oomguard.knobs import precision_of

    a = r.args
    want = {"per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "learning_rate": a.learning_rate, "max_grad_norm": a.max_grad_norm,
            "lora_r": r.adapter["r"], "lora_alpha": r.adapter["lora_alpha"],
            # the policy declares these too (with other values): the child's own must win
            "precision": precision_of(a.bf16, a.fp16),
            "per_device_eval_batch_size": a.per_device_eval_batch_size,
            "dataloader_num_workers": a.dataloader_num_workers}
    if style.trl:
        want["max_seq_length"] = a.max_length  # SFTConfig's own field
    elif style.length_flag is not None:
        want["max_seq_length"] = style.length_flag  # a flag in argv (--max_seq_length / --block_size)
    return want


# --- A. no fault: attempt 1 is the command -----------------------------------------------------


@pytest.mark.parametrize("name", STYLES)
def test_no_fault_attempt_one_is_the_command_alone(name, tmp_path_factory):
    """Without a fault, ``oomguard run -- CMD`` runs CMD exactly as CMD runs alone:
    (i) attempt 1's argv is the command byte for byte (one attempt, succeeded);
    (ii) the final ``training_args.bin`` equals the alone run's, every field (the policy's
         batch 2 / accumulation 8 / lr 2e-4 / max_grad_norm 0.3 / fp16 / workers 2 did not leak);
    (iii) ``adapter_config.json`` is the alone run's (r 8, lora_alpha 16, not the policy's 16 / 64),
         and the loss curve is the alone run's (same training, not just same arguments);
    (iv) checkpoints landed in the command's own output dir (flag, JSON, YAML, ``--out``) and
         nowhere else — no ``<run-dir>/checkpoints``; run.json's checkpoint_dir is that dir;
    (v) run.json ``requested`` is what the child ran, read from the child's own files (and no
        ``max_seq_length`` for a plain-TrainingArguments child whose length is not in argv)."""
    _, plain = shared_alone(tmp_path_factory, name)
    style, run_dir = shared_wrapped(tmp_path_factory, name)
    run = json.loads((run_dir / "run.json").read_text())
    wrapped = read_result(style, run_dir)

    # (i)
    assert run["status"] == "succeeded" and len(run["attempts"]) == 1, [a["failure"] for a in run["attempts"]]
    assert run["attempts"][0]["command"] == style.command
    # (ii)
    changed = {k: v for k, v in diff(plain.fields, wrapped.fields).items() if k not in VOLATILE_FIELDS}
    assert changed == {}, f"{name}: training arguments differ from the command alone (alone, wrapped): {changed}"
    # (iii)
    assert (wrapped.adapter["r"], wrapped.adapter["lora_alpha"]) == (plain.adapter["r"], plain.adapter["lora_alpha"])
    assert diff(plain.adapter, wrapped.adapter) == {}
    assert wrapped.loss_steps == plain.loss_steps == list(range(1, MAX_STEPS + 1))
    assert wrapped.losses == pytest.approx(plain.losses, rel=1e-5)
    # (iv)
    rel_out = str(style.out.relative_to(style.cwd))
    assert wrapped.checkpoints == [f"{rel_out}/checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    assert not (run_dir / "checkpoints").exists()
    assert Path(run["checkpoint_dir"]).resolve() == style.out.resolve()
    # (v)
    want = expected_requested(style, wrapped)
    assert {k: run["requested"].get(k, "<absent>") for k in want} == want
    if "max_seq_length" not in want:
        assert "max_seq_length" not in run["requested"], run["requested"]


# --- B. injected OOM: one knob the child has, changed once --------------------------------------


@pytest.mark.parametrize("name", STYLES)
def test_injected_oom_halves_the_batch_the_child_really_has(name, tmp_path_factory):
    """``--inject cuda_oom@step=3`` raises a genuine torch OOM in step 3 (after checkpoint-2). The
    policy's first two cuda_oom rungs (a knob no child has; bf16, which the CPU lacks) must be passed
    over without spending an attempt, so the run is exactly 2 attempts and attempt 2 halves the batch:
    - the child's OWN final training_args.bin (and checkpoint-4's): per-device batch halved and
      accumulation doubled vs the command alone, so batch x accumulation is unchanged; every other
      field is the alone run's (one knob changed, nothing else) and the adapter is the alone run's;
    - attempt 2 resumed from the command's own checkpoint-2; checkpoint-4's trainer_state has
      global_step == max_steps and every step 1..max_steps logged exactly once;
    - argparse: batch and accumulation are flags it owns (--micro_batch_size, --grad_accum), so attempt
      2's argv is attempt 1's with exactly those two values edited in place, nothing appended."""
    _, plain = shared_alone(tmp_path_factory, name)
    style, run_dir = shared_oom(tmp_path_factory, name)
    run = json.loads((run_dir / "run.json").read_text())

    assert run["status"] == "succeeded"
    assert len(run["attempts"]) == 2, [(a["rung"], a["failure"]) for a in run["attempts"]]
    first, second = run["attempts"]
    assert first["command"] == style.command
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["step"] == 2
    assert second["failure"] is None
    assert second["rung"] == {"ladder": "cuda_oom", "index": 2}  # rungs 0 and 1 passed over
    assert Path(second["resumed_from"]).resolve() == (style.out / "checkpoint-2").resolve()

    b0, g0 = plain.args.per_device_train_batch_size, plain.args.gradient_accumulation_steps
    for saved in (style.out / "training_args.bin", style.out / f"checkpoint-{MAX_STEPS}" / "training_args.bin"):
        args = load_args(saved)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (b0 // 2, g0 * 2), saved
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == b0 * g0
        assert (args.bf16, args.fp16) == (plain.args.bf16, plain.args.fp16)  # the bf16 rung was not taken

    final = read_result(style, run_dir)
    others = diff({k: v for k, v in plain.fields.items()}, final.fields)
    knob_fields = {"per_device_train_batch_size", "gradient_accumulation_steps"}
    # output_dir differs by construction (a fresh work dir); relative in config styles, so then equal
    others = {k: v for k, v in others.items() if k not in knob_fields | {"output_dir"} | VOLATILE_FIELDS}
    assert others == {}, f"{name}: more than the batch changed (alone, recovered): {others}"
    assert (final.adapter["r"], final.adapter["lora_alpha"]) == (plain.adapter["r"], plain.adapter["lora_alpha"])

    assert final.state["global_step"] == MAX_STEPS
    assert final.loss_steps == list(range(1, MAX_STEPS + 1))
    rel_out = str(style.out.relative_to(style.cwd))
    assert final.checkpoints == [f"{rel_out}/checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    assert not (run_dir / "checkpoints").exists()

    if name == "argparse":
        want = list(style.command)
        for flag, value in (("--micro_batch_size", b0 // 2), ("--grad_accum", g0 * 2)):
            want[want.index(flag) + 1] = str(value)
        assert second["command"] == want
