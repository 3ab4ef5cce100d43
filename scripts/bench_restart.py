"""Restart cost, cold vs warm spare (issue 17): from the failed attempt's end to the next completed step.

Each sample is one ``oomguard run --inject cuda_oom@step=K [--warm-spare | --no-warm-spare] -- python
THIS --child ...``: a plain ``transformers.Trainer`` script (tiny Llama on CPU, or the Llama-3-8B shape
in 4-bit QLoRA on CUDA) that saves every 2 steps and OOMs at step K; attempt 2 resumes from the last
checkpoint. Attempt 1 holds ``--hold-s`` seconds after its first step (a run trains for hours before it
fails; the spare is ready by then). Cold and warm alternate, so a slow moment hits both. Read from the
run's journal:

- ``restart_s``: ``attempt_ended`` of attempt 1 → the first ``step`` event of attempt 2 (what the issue measures);
- ``dying_s``: attempt 1's ``error_recorded`` → its ``attempt_ended`` (the failed child's way out);
- ``between_s``: attempt 1's end → attempt 2's ``attempt_started`` (decision, GPU release wait, backoff);
- ``start`` / ``waited_s``: the ``child_start`` event (warm or cold, the wait for the spare).

    python scripts/bench_restart.py --samples 3                       # CPU, tiny model
    python3 scripts/bench_restart.py --device cuda --model llama3-8b --samples 2 --hold-s 30
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
                              gradient_checkpointing=cuda)
    Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Hold()]).train()


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
    return {"start": start.get("start"), "waited_s": start.get("waited_s"), "spare_rss": start.get("spare_rss"),
            "restart_s": round(step2["time"] - ended1["time"], 2) if step2 else None,
            "dying_s": round(ended1["time"] - error1["time"], 2) if error1 else None,
            "between_s": round(started2["time"] - ended1["time"], 2) if started2 else None,
            "reason": start.get("reason")}


def one(args: argparse.Namespace, mode: str, i: int, out: Path) -> dict:
    run_dir, ckpt = out / f"{mode}-{i}" / "run", out / f"{mode}-{i}" / "out"
    policy = out / "policy.yaml"
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           f"--{'' if mode == 'warm' else 'no-'}warm-spare", "--inject", f"cuda_oom@step={args.fail_at}", "--",
           sys.executable, str(Path(__file__).resolve()), "--child", "--device", args.device, "--model", args.model,
           "--model-dir", str(args.model_dir), "--output-dir", str(ckpt), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--hold-s", str(args.hold_s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    got = {"mode": mode, "sample": i, "exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 1)}
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return got
    check = out / f"{mode}-{i}" / "spare_check.json"
    return {**got, **measure(run_dir), **({"spare_check": json.loads(check.read_text())} if check.exists() else {})}


def bench(args: argparse.Namespace) -> None:
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    precision = "bf16" if args.device == "cuda" else "fp32"
    (out / "policy.yaml").write_text(POLICY % {"batch": args.batch, "seq": args.seq, "precision": precision})
    if args.model == "llama3-8b" and not (Path(args.model_dir) / "config.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", "--model-dir", args.model_dir],
                       check=True, timeout=600)  # its own process: this one never holds CUDA memory
    rows: list[dict] = []
    for i in range(args.samples):
        modes = args.modes.split(",")
        for mode in modes if i % 2 == 0 else modes[::-1]:
            rows.append(one(args, mode, i, out))
            print(json.dumps(rows[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'mode':5} {'restart_s':>9} {'dying_s':>7} {'between_s':>9} {'waited_s':>8}  start")
    for r in rows:
        print(f"{r['mode']:5} {r.get('restart_s')!s:>9} {r.get('dying_s')!s:>7} {r.get('between_s')!s:>9} "
              f"{r.get('waited_s')!s:>8}  {r.get('start')}")
    for mode in ("cold", "warm"):
        got = [r["restart_s"] for r in rows if r["mode"] == mode and r.get("restart_s") is not None]
        if got:
            print(f"{mode}: restart_s median {statistics.median(got):.2f} (min {min(got):.2f}, max {max(got):.2f}, "
                  f"n={len(got)})")


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
    args = p.parse_args()
    if args.build:
        build_8b(Path(args.model_dir))
    elif args.child:
        child(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
