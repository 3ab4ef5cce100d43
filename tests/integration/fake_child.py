"""A stdlib-only training child for supervisor edge cases (no torch: fast and exact).

It "trains" by counting steps, writes HF-shaped checkpoints, touches the heartbeat, reads
knobs from its flags (so flag rewriting is exercised) and fails on demand. Real-training
proofs live in the recipe/guard tests; this child is only for the supervisor's logic.
"""

import argparse
import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from oomguard import protocol  # noqa: E402


def save_checkpoint(out: Path, step: int) -> None:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    (ck / "optimizer.pt").write_bytes(b"opt")
    (ck / "scheduler.pt").write_bytes(b"sch")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per_device_train_batch_size", type=int, default=8)
    ap.add_argument("--gradient_accumulation_steps", type=int, default=1)
    ap.add_argument("--max_seq_length", type=int, default=512)
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--max_steps", type=int, default=6)
    ap.add_argument("--save_steps", type=int, default=2)
    ap.add_argument("--step_s", type=float, default=0.02)
    ap.add_argument("--oom_over", type=int, default=None, help="OOM when batch*seq exceeds this")
    ap.add_argument("--oom_style", default="stderr", choices=["stderr", "record", "bnb"])
    ap.add_argument("--fail_at", type=int, default=3, help="step at which a failure fires")
    ap.add_argument("--mode", default="ok", choices=["ok", "nan", "sigkill", "hang", "crash", "crash_once"])
    ap.add_argument("--truncate_newest", action="store_true", help="corrupt the newest checkpoint on failure")
    args = ap.parse_args()
    env = os.environ
    out = Path(env.get(protocol.ENV_CHECKPOINT_DIR) or args.output_dir or "out")
    run_dir = Path(env.get(protocol.ENV_RUN_DIR, "."))
    resume = env.get(protocol.ENV_RESUME_FROM) or ""
    start = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]) if resume else 0
    print(f"fake child: batch={args.per_device_train_batch_size} accum={args.gradient_accumulation_steps} "
          f"seq={args.max_seq_length} start={start} knobs={env.get(protocol.ENV_KNOBS)}", flush=True)
    attempt = int(env.get(protocol.ENV_ATTEMPT, "1"))
    for step in range(start + 1, args.max_steps + 1):
        time.sleep(args.step_s)
        if step == args.fail_at:
            too_big = args.oom_over is not None and args.per_device_train_batch_size * args.max_seq_length > args.oom_over
            if too_big and args.truncate_newest:
                newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                weights = newest / "adapter_model.safetensors"
                weights.write_bytes(weights.read_bytes()[:-2])
            if too_big and args.oom_style == "stderr":
                print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
                return 1
            if too_big and args.oom_style == "bnb":
                print("Error out of memory at line 380 in file /src/csrc/ops.cu", file=sys.stderr)
                return 1
            if too_big and args.oom_style == "record":
                protocol.write_error_record(env[protocol.ENV_ERROR_FILE], protocol.ErrorRecord(
                    kind=protocol.FailureKind.CUDA_OOM, phase=protocol.Phase.FORWARD_BACKWARD, step=step - 1,
                    detail="CUDA out of memory (record)"))
                return 1
            if args.mode == "nan" and attempt == 1:
                protocol.write_error_record(env[protocol.ENV_ERROR_FILE], protocol.ErrorRecord(
                    kind=protocol.FailureKind.NAN_LOSS, phase=protocol.Phase.OPTIMIZER_STEP, step=step - 1,
                    detail="non-finite grad norm", last_finite_step=step - 1))
                return 1
            if args.mode == "sigkill" and attempt == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.mode == "hang" and attempt == 1:
                time.sleep(3600)
            if args.mode == "crash" or (args.mode == "crash_once" and attempt == 1):
                print("Traceback (most recent call last):\nValueError: a bug in the script", file=sys.stderr)
                return 1
        protocol.touch(run_dir / protocol.HEARTBEAT)
        protocol.emit_event(run_dir, "step", step=step, source="child")
        if step % args.save_steps == 0 or step == args.max_steps:
            save_checkpoint(out, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
