"""A stdlib-only training child for supervisor edge cases (no torch: fast and exact).

It "trains" by counting steps, writes HF-shaped checkpoints, touches the heartbeat, reads
knobs from its flags (so flag rewriting is exercised) and fails on demand. Like the real
guard (oomguard/guard/shutdown.py) it turns SIGTERM/SIGINT into "save at the end of this
step, then exit 128+signal". Real-training proofs live in the recipe/guard tests and in
test_reliability.py; this child is only for the supervisor's logic.

``--plan`` drives a soak: attempt n (1-based) does one step past its resume point, saves it,
then fails with ``plan[n-1]`` (an attempt past the plan trains to the end).
"""

import argparse
import json
import os
import resource
import signal
import struct
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from oomguard import protocol  # noqa: E402

PLAN_KINDS = ("oom", "oom_record", "bnb", "nan", "host_oom", "hang", "crash", "resume_oom", "torn", "ok")
STOP = {"signum": None}


def on_stop_signal(signum, _frame):
    STOP["signum"] = signum


def stop_reason() -> str:
    return f"received {signal.Signals(STOP['signum']).name}"  # as the guard's ShutdownCallback says it


def emit(run_dir: Path, event: "protocol.Event", **fields) -> None:
    """Journal one event in the real guard's vocabulary (protocol.Event) and shape: rank 0, the catalogue's
    source (the guard's Journal writes ``rank``; emit_event adds ``source``)."""
    protocol.emit_event(run_dir, event.value, rank=0, **fields)


def save_checkpoint(out: Path, step: int, run_dir: Path, opt_bytes: int = 3, opt_zip: bytes | None = None) -> None:
    """Weights, optimizer, scheduler, then trainer_state.json last (as HF does: nothing atomic)."""
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    (ck / "optimizer.pt").write_bytes(b"o" * opt_bytes)
    if opt_zip is not None:  # --opt_zip: torch.save's format instead
        write_zip_optimizer(ck, opt_zip)
    (ck / "scheduler.pt").write_bytes(b"sch")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    emit(run_dir, protocol.Event.CHECKPOINT_SAVED, step=step, path=str(ck))


OPT_STATE = b"optimizer state, as the fake child writes it"


def write_zip_optimizer(ck: Path, payload: bytes = OPT_STATE) -> None:
    """optimizer.pt as torch.save writes it since 1.6: a zip of stored members, each with its CRC."""
    with zipfile.ZipFile(ck / "optimizer.pt", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)


def corrupt_zip_member(ck: Path) -> None:
    """Flip bytes inside the member's data; the zip's end record and central directory stay intact."""
    path = ck / "optimizer.pt"
    raw = bytearray(path.read_bytes())
    at = raw.index(OPT_STATE)
    raw[at:at + 4] = b"XXXX"
    path.write_bytes(bytes(raw))


def load_problem(ck: Path) -> str | None:
    """What torch.load would trip over in this checkpoint's zip optimizer.pt, or None."""
    try:
        with zipfile.ZipFile(ck / "optimizer.pt") as z:
            if z.testzip() is not None or z.read("archive/data.pkl") != OPT_STATE:
                return "invalid load key, 'g'."
    except (zipfile.BadZipFile, OSError) as exc:
        return f"PytorchStreamReader failed reading zip archive: {exc}"
    return None


def kill_supervisor() -> None:
    """The supervisor dies (SIGKILL, power) after its child failed, before it could decide."""
    os.kill(int(os.environ[protocol.ENV_SUPERVISOR_PID]), signal.SIGKILL)
    time.sleep(0.2)  # let it go first: its death is what this mode is for


def record(kind, step, detail, phase=protocol.Phase.FORWARD_BACKWARD, **extra) -> int:
    protocol.write_error_record(os.environ[protocol.ENV_ERROR_FILE], protocol.ErrorRecord(
        kind=kind, phase=phase, step=step, detail=detail, **extra))
    return 1


def hang() -> None:
    while True:  # deaf to SIGTERM, as a child stuck in a collective or a dead dataloader is
        time.sleep(0.05)


def tear_journal(run_dir: Path) -> None:
    """Half a JSON line with no newline, then death: what a kill mid-write leaves."""
    with open(run_dir / protocol.EVENTS_JSONL, "ab") as f:
        f.write(b'{"time": 1, "event": "step", "step": 99, "sou')
    os.kill(os.getpid(), signal.SIGKILL)


def fail_planned(kind: str, step: int, run_dir: Path) -> int | None:
    """Fail the way ``kind`` says at ``step`` (the step now starting); None for ``ok``."""
    done = step - 1
    if kind == "oom":
        print(f"torch.OutOfMemoryError: CUDA out of memory at step {step}", file=sys.stderr)
        return 1
    if kind == "bnb":
        print("Error out of memory at line 380 in file /src/csrc/ops.cu", file=sys.stderr)
        return 1
    if kind == "oom_record":
        return record(protocol.FailureKind.CUDA_OOM, done, "CUDA out of memory (record)")
    if kind == "nan":
        return record(protocol.FailureKind.NAN_LOSS, done, "non-finite grad norm", phase=protocol.Phase.OPTIMIZER_STEP,
                      last_finite_step=done)
    if kind == "host_oom":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        hang()
    if kind == "torn":
        tear_journal(run_dir)
    if kind == "crash":
        print(f"Traceback (most recent call last):\nRuntimeError: transient failure at step {step}", file=sys.stderr)
        return 1
    return None


def fill_disk(out: Path, leave: int) -> None:
    """Another writer takes the checkpoint filesystem's space, all but ``leave`` bytes."""
    st = os.statvfs(out)
    free = st.f_bavail * st.f_frsize
    with open(out / ".filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def limit_file_size(limit: int) -> None:
    """RLIMIT_FSIZE: a write past ``limit`` bytes fails with EFBIG ("File too large")."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per_device_train_batch_size", type=int, default=8)
    ap.add_argument("--gradient_accumulation_steps", type=int, default=1)
    ap.add_argument("--max_seq_length", type=int, default=512)
    ap.add_argument("--precision", default="bf16", choices=protocol.PRECISIONS)
    ap.add_argument("--output_dir", default=None)
    ap.add_argument("--max_steps", type=int, default=6)
    ap.add_argument("--save_steps", type=int, default=2)
    ap.add_argument("--step_s", type=float, default=0.02)
    ap.add_argument("--oom_over", type=int, default=None, help="OOM when batch*seq exceeds this")
    ap.add_argument("--oom_style", default="stderr", choices=["stderr", "record", "bnb"])
    ap.add_argument("--fail_at", type=int, default=3, help="step at which a failure fires")
    ap.add_argument("--fail_also_at", type=int, default=None, help="a second step at which --oom_over fires")
    ap.add_argument("--mode", default="ok",
                    choices=["ok", "nan", "nan_always", "sigkill", "hang", "crash", "crash_once", "torn",
                             "caught_oom_crash"])
    ap.add_argument("--truncate_newest", action="store_true", help="corrupt the newest checkpoint on failure")
    ap.add_argument("--plan", default="", help=f"comma list, one per attempt, of {', '.join(PLAN_KINDS)}")
    ap.add_argument("--opt_bytes", type=int, default=3, help="size of optimizer.pt")
    ap.add_argument("--disk_full_at", type=int, default=None, help="the save at this step finds the disk full")
    ap.add_argument("--disk_full_by", default="fill", choices=["fill", "fsize"])
    ap.add_argument("--disk_full_attempts", type=int, default=1, help="attempts whose save finds the disk full")
    ap.add_argument("--stop_delay_s", type=float, default=0.0, help="steps go on this long after a stop signal")
    ap.add_argument("--hang_at_start", action="store_true", help="hang before the first heartbeat, every attempt")
    ap.add_argument("--spew_bytes", type=int, default=0, help="write this many bytes to stderr, no newline, at start")
    ap.add_argument("--stderr_chatter", type=int, default=0, help="lines written to stderr per step")
    ap.add_argument("--daemon_sleeper", type=float, default=0.0, help="start a daemonized sleeper of this many s")
    # additions for tests/integration/test_reliability_resume.py
    ap.add_argument("--resume_from_checkpoint", default=None,
                    help="the command's own resume point: used when the supervisor chose none (attempt 1)")
    ap.add_argument("--opt_zip", action="store_true", help="optimizer.pt is a zip (torch.save's format)")
    ap.add_argument("--corrupt_newest_member", action="store_true",
                    help="with --opt_zip: on failure, damage the newest checkpoint's optimizer.pt inside")
    ap.add_argument("--unloadable_at", type=int, default=None,
                    help="with --opt_zip: the save at this step holds state no loader can read (CRC intact)")
    ap.add_argument("--kill_supervisor_at_fail", action="store_true",
                    help="attempt 1 SIGKILLs its supervisor right after failing")
    ap.add_argument("--hub_token", default=None, help="a secret the supervisor must never write down")
    ap.add_argument("--api_key", default=None, help="a secret, --x=v form")
    ap.add_argument("--argv_out", default=None, help="write the argv this child got (JSON) to this file")
    # issue 18 item 5 (grow back): a memory figure per step, and the guard's stop on the supervisor's request
    ap.add_argument("--memory_per_row", type=int, default=None,
                    help="journal a memory sample per step whose step_peak is batch x this many bytes")
    return ap.parse_args()


def legacy_failure(args, step: int, attempt: int, out: Path, run_dir: Path) -> int | None:
    """The single-failure modes of --fail_at (see test_supervisor.py)."""
    too_big = args.oom_over is not None and args.per_device_train_batch_size * args.max_seq_length > args.oom_over
    if too_big and args.truncate_newest:
        newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-2])
    if too_big:
        return fail_planned({"stderr": "oom", "bnb": "bnb", "record": "oom_record"}[args.oom_style], step, run_dir)
    if (args.mode == "nan" and attempt == 1) or args.mode == "nan_always":
        return fail_planned("nan", step, run_dir)
    if args.mode in ("sigkill", "hang", "torn") and attempt == 1:
        return fail_planned({"sigkill": "host_oom"}.get(args.mode, args.mode), step, run_dir)
    if args.corrupt_newest_member and attempt == 1:
        corrupt_zip_member(max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])))
    if args.mode == "caught_oom_crash":  # an OOM the script caught and survived, then a real bug
        print("warning: CUDA out of memory in the optional eval probe; caught, skipping it", file=sys.stderr)
        print("Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n"
              "ValueError: a bug in the script", file=sys.stderr)
        return 1
    if args.mode == "crash" or (args.mode == "crash_once" and attempt == 1):
        print("Traceback (most recent call last):\nValueError: a bug in the script", file=sys.stderr)
        return 1
    return None


def save_maybe_full(args, out: Path, step: int, run_dir: Path, attempt: int) -> None:
    if args.disk_full_at == step and attempt <= args.disk_full_attempts:
        if args.disk_full_by == "fill":
            fill_disk(out, leave=8192)
        else:
            limit_file_size(args.opt_bytes // 2)
    opt_zip = (b"garbage" if args.unloadable_at == step else OPT_STATE) if args.opt_zip else None
    save_checkpoint(out, step, run_dir, args.opt_bytes, opt_zip)  # OSError (ENOSPC/EFBIG) ends us with a traceback


def report_recipe(args, run_dir: Path, attempt: int, out: Path) -> None:
    """What the real guard reports (``recipe_observed``, both stages): the knobs from the flags, with
    oomguard's orders applied on top as the bootstrap would apply them to an arguments object."""
    knobs = {"per_device_train_batch_size": args.per_device_train_batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps,
             "max_seq_length": args.max_seq_length, "precision": args.precision}
    orders = json.loads(os.environ.get(protocol.ENV_KNOBS) or "{}")
    knobs.update({k: v for k, v in orders.items() if k in knobs})
    args.per_device_train_batch_size = knobs["per_device_train_batch_size"]
    args.gradient_accumulation_steps = knobs["gradient_accumulation_steps"]
    args.max_seq_length, args.precision = knobs["max_seq_length"], knobs["precision"]
    effective = knobs["per_device_train_batch_size"] * knobs["gradient_accumulation_steps"]
    for stage in (protocol.STAGE_BUILT, protocol.STAGE_IN_FORCE):
        emit(run_dir, protocol.Event.RECIPE_OBSERVED, attempt=attempt, stage=stage, knobs=knobs,
             fields={k: k for k in knobs}, effective_batch=effective, world_size=1, output_dir=str(out.absolute()),
             trainer="FakeTrainer", args_class="Namespace", lr_scheduler_type=None, optim=None, lora=False)


def grow_requested(run_dir: Path, attempt: int) -> bool:
    """As the guard's ShutdownCallback: <run_dir>/grow_request.json naming this attempt."""
    path = run_dir / protocol.GROW_REQUEST_JSON
    try:
        return path.exists() and json.loads(path.read_text()).get("attempt") == attempt
    except (OSError, ValueError):
        return False


def stop_to_grow(run_dir: Path, out: Path, step: int, attempt: int, opt_bytes: int) -> int:
    """The guard's grow-back stop: save at this step end, journal it, exit 0 (the run is not over)."""
    emit(run_dir, protocol.Event.SHUTDOWN_REQUESTED, step=step,
         reason="the supervisor asked to save and stop here to grow the batch back")
    save_checkpoint(out, step, run_dir, opt_bytes)
    emit(run_dir, protocol.Event.GROW_STOPPED, step=step, path=str(out / f"checkpoint-{step}"), attempt=attempt)
    return 0


def daemonize_sleeper(seconds: float) -> None:
    """Double fork + setsid: a grandchild in no group or tree of ours that outlives us (as a
    daemonizing helper does); it keeps this process's environment, OOMGUARD_RUN_DIR included."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)  # a plain sleeper, not a trainer that saves first
    time.sleep(seconds)
    os._exit(0)


def process_extras(args) -> None:
    """The supervisor's process edge cases, before the first heartbeat."""
    if args.daemon_sleeper:
        daemonize_sleeper(args.daemon_sleeper)
    chunk = b"x" * (1 << 20)
    for left in range(args.spew_bytes, 0, -len(chunk)):  # one huge line, written in 1 MiB pieces
        sys.stderr.buffer.write(chunk[:left])
    sys.stderr.flush()
    if args.hang_at_start:  # model load / dataset map / rendezvous that never returns
        hang()


def main() -> int:
    args = parse()
    if args.argv_out:  # what really ran, secrets included (the supervisor redacts only its files)
        Path(args.argv_out).write_text(json.dumps(sys.argv[1:]))
    env = os.environ
    run_dir = Path(env.get(protocol.ENV_RUN_DIR, "."))
    out = Path(env.get(protocol.ENV_CHECKPOINT_DIR) or args.output_dir or run_dir / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    attempt = int(env.get(protocol.ENV_ATTEMPT, "1"))
    if attempt > args.disk_full_attempts and (out / ".filler").exists():
        (out / ".filler").unlink()  # whoever filled the disk is gone by the retry
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):  # as the guard's ShutdownCallback
        signal.signal(s, on_stop_signal)
    plan = [k.strip() for k in args.plan.split(",") if k.strip()]
    unknown = sorted(set(plan) - set(PLAN_KINDS))
    if unknown:
        print(f"fake child: unknown --plan kinds {unknown}; use {', '.join(PLAN_KINDS)}", file=sys.stderr)
        return 2
    kind = plan[attempt - 1] if attempt <= len(plan) else "ok"
    if protocol.ENV_RUN_DIR in env:
        report_recipe(args, run_dir, attempt, out)
    # as the bootstrap's choose_resume: the supervisor's choice, else (attempt 1) the command's own
    resume = env[protocol.ENV_RESUME_FROM] if protocol.ENV_RESUME_FROM in env else (args.resume_from_checkpoint or "")
    start = int(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]) if resume else 0
    problem = load_problem(Path(resume)) if resume and args.opt_zip else None
    if problem is not None:
        print(f"Traceback (most recent call last):\n  File \"trainer.py\", line 1, in _load_optimizer\n"
              f"_pickle.UnpicklingError: {problem}", file=sys.stderr)
        return record(protocol.FailureKind.CRASH, start, f"UnpicklingError: {problem}",
                      phase=protocol.Phase.CHECKPOINT_LOAD)
    print(f"fake child: batch={args.per_device_train_batch_size} accum={args.gradient_accumulation_steps} "
          f"seq={args.max_seq_length} start={start} knobs={env.get(protocol.ENV_KNOBS)}", flush=True)
    process_extras(args)  # --hang_at_start, --spew_bytes, --daemon_sleeper (supervisor process edge cases)
    if kind == "resume_oom":
        return record(protocol.FailureKind.RESUME_OOM, start, "CUDA out of memory loading the optimizer state",
                      phase=protocol.Phase.CHECKPOINT_LOAD)
    stopping_since = None
    for step in range(start + 1, args.max_steps + 1):
        time.sleep(args.step_s)
        if plan and step == start + 2 and kind != "ok":
            return fail_planned(kind, step, run_dir) or 0
        if not plan and step in (args.fail_at, args.fail_also_at):
            code = legacy_failure(args, step, attempt, out, run_dir)
            if code is not None and args.kill_supervisor_at_fail and attempt == 1:
                kill_supervisor()
            if code is not None:
                return code
        protocol.touch(run_dir / protocol.HEARTBEAT)
        emit(run_dir, protocol.Event.STEP, step=step, max_steps=args.max_steps, epoch=None, attempt=attempt)
        if args.memory_per_row is not None:
            emit(run_dir, protocol.Event.MEMORY, step=step, step_peak=args.per_device_train_batch_size * args.memory_per_row)
        if protocol.ENV_RUN_DIR in env and STOP["signum"] is None and grow_requested(run_dir, attempt):
            return stop_to_grow(run_dir, out, step, attempt, args.opt_bytes)
        for i in range(args.stderr_chatter):
            print(f"fake child: chatter {i} at step {step}", file=sys.stderr, flush=True)
        if STOP["signum"] is not None:
            if stopping_since is None:
                stopping_since = time.monotonic()
                emit(run_dir, protocol.Event.SHUTDOWN_REQUESTED, step=step, reason=stop_reason())
            if time.monotonic() - stopping_since >= args.stop_delay_s:
                save_checkpoint(out, step, run_dir, args.opt_bytes)
                emit(run_dir, protocol.Event.SHUTDOWN_SAVED, step=step, reason=stop_reason(),
                     path=str(out / f"checkpoint-{step}"))
                return 128 + STOP["signum"]
        if step % args.save_steps == 0 or step == args.max_steps or plan:
            save_maybe_full(args, out, step, run_dir, attempt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
