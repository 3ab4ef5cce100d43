"""Restart cost, cold vs warm spare (issue 17): from the failed attempt's end to the next completed step.

Each sample is one ``oomguard run --inject cuda_oom@step=K [--warm-spare | --no-warm-spare] -- COMMAND``
for one of three commands (``--commands``), each resuming from its last checkpoint in attempt 2:

- ``script``: ``python THIS --child …``, a plain ``transformers.Trainer`` script (tiny Llama on CPU, or the
  Llama-3-8B shape in 4-bit QLoRA on CUDA) that saves every 2 steps; attempt 1 holds ``--hold-s`` seconds
  after its first step (a run trains for hours before it fails; the spare is ready by then);
- ``trl``: the real ``trl sft`` CLI (a launcher whose accelerate worker trains; warm, the worker forks from
  the warm launcher) on the same model, QLoRA flags, the bench's data;
- ``recipe``: the built-in recipe, ``python -m oomguard.recipes.sft`` (4-bit on CUDA).

``trl`` and ``recipe`` train ``--long-fail-at`` steps before the OOM (there is no hold in a command we do not
write), saving every ``--long-save`` steps. Cold and warm alternate, so a slow moment hits both. Read from
the run's journal:

- ``restart_s``: ``attempt_ended`` of attempt 1 → the first ``step`` event of attempt 2 (what the issue measures);
- ``dying_s``: attempt 1's ``error_recorded`` → its ``attempt_ended`` (the failed child's way out);
- ``between_s``: attempt 1's end → attempt 2's ``attempt_started`` (decision, GPU release wait, backoff);
- ``start`` / ``waited_s`` / ``worker``: the ``child_start`` event (warm or cold, the wait for the spare), and
  a launcher's ``worker_start`` (fork or exec).

``--auto`` adds HF ``auto_find_batch_size``'s in-process restart in the same run: the script, unwrapped, with
an OOM raised in its step K; ``restart_s`` there is the raise → the next completed step (HF halves the batch
and restarts its training loop from step 0 in the same process).

    python scripts/bench_restart.py --samples 3                       # CPU, tiny model
    python3 scripts/bench_restart.py --device cuda --model llama3-8b --samples 1 --hold-s 20 --batch 2 --seq 1024 \
        --commands script,trl,recipe --auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}
TINY = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
POLICY = """name: bench-restart
description: issue 17 bench; a cuda_oom halves the batch (accumulation up)
knobs: {max_seq_length: %(seq)d, per_device_train_batch_size: %(batch)d, gradient_accumulation_steps: 1, lora_r: 16,
        lora_alpha: 32, precision: %(precision)s}
ladders:
  cuda_oom:
    rungs:
      - {op: halve_batch, floor: 1, max_times: 2, resume: safe}
limits:
  max_attempts: 3
  no_progress_attempts: 3
  hang_timeout_s: 900
  crash_retries: 1
  backoff: {initial_s: 0, multiplier: 1, max_s: 0}
  gpu_release_timeout_s: 60
"""


# --- the child: a user's plain Trainer script ---------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class Hold(TrainerCallback):
        """Attempt 1 trains a while before its OOM (the spare gets ready meanwhile, as in a long run)."""

        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step == 1 and os.environ.get("OOMGUARD_ATTEMPT") == "1":
                time.sleep(args.hold_s)
                _check_spare(Path(args.output_dir).parent / "spare_check.json")

    class InProcessOom(TrainerCallback):
        """``--auto``: an OOM raised in step ``fail_at``'s first pass (HF's find_executable_batch_size catches
        it and restarts the loop at half the batch, in this process); the times written for the bench."""

        raised_at: float | None = None

        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step + 1 == args.fail_at and self.raised_at is None:
                self.raised_at = time.time()
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (bench, injected)")

        def on_step_end(self, targs, state, control, **kwargs):
            if self.raised_at is not None:
                mark = Path(args.output_dir).parent / "auto.json"
                if not mark.exists():
                    mark.write_text(json.dumps({"raised": self.raised_at, "next_step": time.time(),
                                                "batch_after": state.train_batch_size}))  # HF's, after halving

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    if args.model == "llama3-8b":
        model = _qlora_8b(args.model_dir)
        vocab = LLAMA3_8B["vocab_size"]
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY))
        vocab = TINY["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(1, vocab, (args.seq,), generator=gen)), "labels": ids}
            for _ in range(64)]
    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              gradient_accumulation_steps=1, save_steps=2, logging_steps=1, learning_rate=1e-4,
                              use_cpu=not cuda, bf16=cuda, report_to="none", seed=0, dataloader_num_workers=0,
                              gradient_checkpointing=cuda, auto_find_batch_size=args.auto)
    Trainer(model=model, args=targs, train_dataset=rows,
            callbacks=[InProcessOom()] if args.auto else [Hold()]).train()


def _check_spare(path: Path) -> None:
    """Where the spare is at the end of the hold: its pid, RSS, and whether NVML lists it on a GPU."""
    import psutil

    spares = [p for p in psutil.process_iter(["cmdline"]) if "oomguard.spare" in " ".join(p.info["cmdline"] or [])]
    on_gpu: list[int] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            on_gpu += [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
    except Exception:  # noqa: BLE001 - no NVML: nothing to say about the GPU
        on_gpu = []
    path.write_text(json.dumps({"spares": [{"pid": p.pid, "rss": p.memory_info().rss, "on_gpu": p.pid in on_gpu}
                                           for p in spares], "gpu_pids": on_gpu, "me": os.getpid()}))


def _qlora_8b(model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                             device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], task_type="CAUSAL_LM"))


def build_8b(model_dir: Path) -> None:
    """A Llama-3-8B-shaped model with random weights, saved once (no download on the GPU machine)."""
    if (model_dir / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B)).to(torch.bfloat16)
    model.save_pretrained(str(model_dir), max_shard_size="4GB")


# --- the bench: oomguard run, cold and warm, side by side ---------------------------------------------
def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def measure(run_dir: Path) -> dict:
    ev = _events(run_dir)

    def first(name: str, attempt: int, **match):
        return next((e for e in ev if e["event"] == name and e.get("attempt", attempt) == attempt
                     and all(e.get(k) == v for k, v in match.items())), None)

    ended1, started2 = first("attempt_ended", 1), first("attempt_started", 2)
    error1 = next((e for e in ev if e["event"] == "error_recorded" and e["time"] < ended1["time"]), None)
    step2 = next((e for e in ev if e["event"] == "step" and e.get("attempt") == 2), None)
    start = first("child_start", 2) or {}
    worker = first("worker_start", 2) or {}
    return {"start": start.get("start"), "waited_s": start.get("waited_s"), "spare_rss": start.get("spare_rss"),
            "worker": worker.get("start"),
            "worker_reason": worker.get("reason") if worker.get("start") != "fork" else None,
            "restart_s": round(step2["time"] - ended1["time"], 2) if step2 else None,
            "dying_s": round(ended1["time"] - error1["time"], 2) if error1 else None,
            "between_s": round(started2["time"] - ended1["time"], 2) if started2 else None,
            "reason": start.get("reason")}


def _trl_shim(out: Path) -> Path:
    """``trl`` as a console script (the GPU machine's carried wheels install none): the same entry point."""
    shim = out / "bin" / "trl"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text(f"#!{sys.executable}\nimport sys\nfrom trl.cli.main import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    return shim


def user_command(args: argparse.Namespace, command: str, out: Path, ckpt: Path) -> list[str]:
    cuda = args.device == "cuda"
    if command == "script":
        return [sys.executable, str(Path(__file__).resolve()), "--child", "--device", args.device, "--model",
                args.model, "--model-dir", str(args.model_dir), "--output-dir", str(ckpt), "--steps", str(args.steps),
                "--batch", str(args.batch), "--seq", str(args.seq), "--hold-s", str(args.hold_s)]
    steps, save = str(args.long_fail_at + 2), str(args.long_save)
    if command == "trl":
        return [str(_trl_shim(out)), "sft", "--model_name_or_path", str(args.hf_model_dir), "--dataset_name",
                str(out / "data"), "--output_dir", str(ckpt), "--max_steps", steps, "--save_steps", save,
                "--per_device_train_batch_size", str(args.batch), "--max_length", str(args.seq), "--logging_steps",
                "1", "--report_to", "none", "--dataloader_num_workers", "0", "--learning_rate", "1e-4",
                "--use_peft", "--lora_r", "16", "--lora_alpha", "32", "--lora_target_modules", "q_proj", "k_proj",
                "v_proj", "o_proj", "--seed", "0",
                *(["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--dtype", "bfloat16", "--bf16", "true",
                    "--gradient_checkpointing", "true"]
                  if cuda else ["--use_cpu"])]
    return [sys.executable, "-m", "oomguard.recipes.sft", "--model", str(args.hf_model_dir), "--dataset",
            str(out / "data" / "train.jsonl"), "--output_dir", str(ckpt), "--max_steps", steps, "--save_steps", save,
            "--per_device_train_batch_size", str(args.batch), "--max_seq_length", str(args.seq),
            "--logging_steps", "1", "--learning_rate", "1e-4", "--lora_r", "16", "--lora_alpha", "32",
            *(["--precision", "bf16", "--load_in_4bit"] if cuda else ["--precision", "fp32", "--no_4bit"])]


def one(args: argparse.Namespace, command: str, mode: str, i: int, out: Path) -> dict:
    where = out / f"{command}-{mode}-{i}"
    run_dir, ckpt = where / "run", where / "out"
    if mode == "auto":
        return auto_one(args, where)
    fail_at = args.fail_at if command == "script" else args.long_fail_at
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(out / "policy.yaml"), "--run-dir", str(run_dir),
           "--quiet", f"--{'' if mode == 'warm' else 'no-'}warm-spare", "--inject", f"cuda_oom@step={fail_at}", "--",
           *user_command(args, command, out, ckpt)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    got = {"command": command, "mode": mode, "sample": i, "exit": proc.returncode,
           "wall_s": round(time.monotonic() - t0, 1)}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        for log in sorted(run_dir.glob("attempts/*/stderr.log")):
            print(f"--- {log}\n" + log.read_text()[-3000:], file=sys.stderr)
        return got
    check = where / "spare_check.json"
    return {**got, **measure(run_dir), **({"spare_check": json.loads(check.read_text())} if check.exists() else {})}


def auto_one(args: argparse.Namespace, where: Path) -> dict:
    """HF auto_find_batch_size's in-process restart: the script unwrapped, an OOM raised in step --fail-at."""
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--auto", "--device", args.device, "--model",
           args.model, "--model-dir", str(args.model_dir), "--output-dir", str(where / "out"), "--steps",
           str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--fail-at", str(args.fail_at)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")})
    got = {"command": "script", "mode": "auto", "exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 1)}
    mark = where / "auto.json"
    if proc.returncode != 0 or not mark.exists():
        print(proc.stderr[-3000:], file=sys.stderr)
        return got
    times = json.loads(mark.read_text())
    return {**got, "restart_s": round(times["next_step"] - times["raised"], 2), "start": "in-process",
            "batch_after": times["batch_after"]}


def bench(args: argparse.Namespace) -> None:
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if args.device == "cuda" else "fp32"
    (out / "policy.yaml").write_text(POLICY % {"batch": args.batch, "seq": args.seq, "precision": precision})
    commands = args.commands.split(",")
    if set(commands) - {"script"}:
        import bench_common

        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_common.py"), "--out", str(args.hf_model_dir),
                        *([] if args.model == "llama3-8b" else ["--arch", "tiny"])], check=True, timeout=600)
        bench_common.write_dataset(out / "data" / "train.jsonl", [args.seq] * 256, seed=0)
    if args.model == "llama3-8b" and not (Path(args.model_dir) / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", "--model-dir", args.model_dir],
                       check=True, timeout=600)  # its own process: this one never holds CUDA memory
    started = time.monotonic()
    rows: list[dict] = []
    for i in range(args.samples):
        for command in commands:
            modes = args.modes.split(",")
            for mode in modes if i % 2 == 0 else modes[::-1]:
                if args.deadline and time.monotonic() - started > args.deadline:
                    rows.append({"command": command, "mode": mode, "sample": i, "skipped": "deadline"})
                    continue
                rows.append(one(args, command, mode, i, out))
                print(json.dumps(rows[-1]), flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=1))
    if args.auto:
        rows.append(one(args, "script", "auto", 0, out))
        print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'command':8} {'mode':5} {'restart_s':>9} {'dying_s':>7} {'between_s':>9} {'waited_s':>8}  start/worker")
    for r in rows:
        print(f"{r['command']:8} {r['mode']:5} {r.get('restart_s')!s:>9} {r.get('dying_s')!s:>7} "
              f"{r.get('between_s')!s:>9} {r.get('waited_s')!s:>8}  {r.get('start')}/{r.get('worker')}")
    for command in dict.fromkeys(commands + ["script"] * bool(args.auto)):
        for mode in ("cold", "warm", "auto"):
            got = [r["restart_s"] for r in rows
                   if r["command"] == command and r["mode"] == mode and r.get("restart_s") is not None]
            if got:
                print(f"{command} {mode}: restart_s median {statistics.median(got):.2f} (min {min(got):.2f}, "
                      f"max {max(got):.2f}, n={len(got)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=("tiny", "llama3-8b"), default="tiny")
    p.add_argument("--model-dir", default="/tmp/llama3-8b-random")
    p.add_argument("--output-dir", default="")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--fail-at", type=int, default=3, help="the step whose forward OOMs (checkpoint-2 before it)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--hold-s", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default="/tmp/bench-restart")
    p.add_argument("--modes", default="cold,warm", help="which starts to measure, alternating (cold,warm)")
    p.add_argument("--commands", default="script", help="script,trl,recipe: which commands to wrap")
    p.add_argument("--auto", action="store_true", help="also HF auto_find_batch_size's in-process restart")
    p.add_argument("--hf-model-dir", default="/tmp/llama3-8b-random",
                   help="trl/recipe: a model dir with a tokenizer (bench_common's; built if missing)")
    p.add_argument("--long-fail-at", type=int, default=30, help="trl/recipe: the step that OOMs")
    p.add_argument("--long-save", type=int, default=10, help="trl/recipe: save every N steps")
    p.add_argument("--deadline", type=float, default=None, help="s: start no new run past this")
    args = p.parse_args()
    if args.build:
        build_8b(Path(args.model_dir))
    elif args.child:
        child(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
