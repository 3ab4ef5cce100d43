"""Benchmark of ``oomguard tune`` / ``plan`` (issue 18) on the Llama-3-8B shape, emulated cards.

For each card class (t4-16gb → 16 GiB, rtx-24gb → 24 GiB, a100-40gb → 40 GiB, emulated on one big
GPU) and each data length profile (``chat``: short rows; ``long``: long-tailed rows that reach the
max length), it runs the shipped policy's own starting recipe as a user script
(scripts/bench_train.py: NF4, LoRA r16 on q/k/v/o, gradient checkpointing, paged AdamW, TRL SFTTrainer)
under ``oomguard tune --vram SIZE``, and reports from the probe:

- the memory model's error (max / RMS relative residual on the probed points, max leave-one-out);
- the tuned start's tokens/s ÷ the best of the full sweep at the same effective batch and length (every
  per-device batch dividing it, measured side by side in the one probe process, at the worst batch);
- the same ratio for the shipped starting point (``OOM`` when it does not fit at its worst batch);
- tune's wall time (the whole child: imports, 4-bit load, probe).

``--verify CLASS:PROFILE`` then trains that class from its tuned policy (``oomguard run --policy
tuned.yaml --start-from-policy``) on its own data for a few steps: finished without an OOM, its
measured step peak next to the plan's prediction for the worst batch.

    python scripts/bench_tune.py --out /tmp/bench-tune [--tiny] [--classes rtx-24gb] [--profiles long]

``--tiny`` runs it all on CPU on a 2-layer model (no emulation, no memory: the machinery only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_common import build_model, sample_lengths, versions, write_dataset  # noqa: E402

CLASSES = {"t4-16gb": "16GiB", "rtx-24gb": "24GiB", "a100-40gb": "40GiB"}
PROFILES = {"chat": dict(target=256, median_factor=0.55, sigma=0.45),  # median ~140 tokens, longest ~768
            "long": dict(target=2048, median_factor=0.55, sigma=0.45)}  # ~9 % reach the 2048 cut
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on a 2-layer model")
    ap.add_argument("--model", default=None, help="model dir (default: built under /tmp)")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=2, help="probe optimizer steps per configuration")
    ap.add_argument("--verify", default=None, metavar="CLASS:PROFILE")
    ap.add_argument("--timeout", type=int, default=420, help="s per child")
    ap.add_argument("--deadline", type=float, default=None, help="s: start no new child past this")
    return ap.parse_args(argv)


def shipped(name: str):
    from oomguard.policy import load_policy_arg

    return load_policy_arg(name)


def user_command(args, name: str, data: Path, out: Path, *, with_batch: bool = True) -> list[str]:
    """The shipped policy's starting recipe as the user's own flags."""
    k = shipped(name).start_knobs()
    out.parent.mkdir(parents=True, exist_ok=True)  # the --events file lies beside the output dir
    cmd = [sys.executable, str(HERE / "bench_train.py"), "--model", args.model, "--dataset", str(data),
           "--output_dir", str(out), "--max_seq_length", str(min(k["max_seq_length"], 128) if args.tiny
                                                            else k["max_seq_length"]), "--trainer", "sft",
           "--max_steps", "6", "--save_steps", "100", "--events", str(out) + ".events.jsonl"]
    if with_batch:
        cmd += ["--per_device_train_batch_size", str(k["per_device_train_batch_size"]),
                "--gradient_accumulation_steps", str(k["gradient_accumulation_steps"])]
    if not args.tiny:
        cmd.append("--fp16" if k["precision"] == "fp16" else "--bf16")
    return cmd


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    return env


def oomguard(args, argv: list[str], log: Path) -> tuple[int, float]:
    started = time.monotonic()
    with log.open("w") as f:
        try:
            code = subprocess.run([sys.executable, "-m", "oomguard", *argv], stdout=f, stderr=subprocess.STDOUT,
                                  env=child_env(), timeout=args.timeout, cwd=HERE.parent).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.monotonic() - started


def _sweep(record, batch: int, accum: int):
    """Points at the worst length whose batch divides the effective batch (the full sweep)."""
    length = max(p.length for p in record.points)
    eff = batch * accum
    return [p for p in record.points if p.length == length and eff % p.batch == 0]


def _tps(points, batch: int):
    return next((p.tokens_per_s for p in points if p.batch == batch and p.fits), None)


def measure(args, name: str, profile: str, data: Path, out: Path) -> dict:
    from oomguard.tune.choice import make_plan
    from oomguard.tune.record import read_probe

    tag = f"{name}-{profile}"
    run_dir, policy_file = out / "runs" / tag, out / "policies" / f"{tag}.yaml"
    vram = [] if args.tiny else ["--vram", CLASSES[name]]
    cmd = user_command(args, name, data, out / "user-out" / tag)
    batches = ["--batches", "1,2,4"] if args.tiny else []  # a 128k vocabulary on one CPU core: keep it small
    code, wall = oomguard(args, ["tune", "--gpu-class", name, *vram, "-o", str(policy_file), "--run-dir",
                                 str(run_dir), "--steps", str(args.steps), *batches, "--", *cmd],
                          out / f"tune-{tag}.log")
    row = {"class": name, "profile": profile, "vram": None if args.tiny else CLASSES[name], "exit": code,
           "tune_wall_s": round(wall, 1), "policy_file": str(policy_file)}
    if code != 0:
        return row
    record, k = read_probe(run_dir), shipped(name).start_knobs()
    b0, g0 = k["per_device_train_batch_size"], k["gradient_accumulation_steps"]
    plan = make_plan(record, shipped(name))
    sweep = _sweep(record, b0, g0)
    best = max((p for p in sweep if p.fits and p.tokens_per_s), key=lambda p: p.tokens_per_s, default=None)
    tuned = plan.best
    row.update(worst_row=record.worst_row, probe_wall_s=record.wall_s, points=[p.__dict__ for p in record.points],
               shipped=f"{b0}x{g0}", tuned=f"{tuned.batch}x{tuned.accumulation}" if tuned else None,
               best=f"{best.batch}x{(b0 * g0) // best.batch}" if best else None,
               best_tps=best.tokens_per_s if best else None,
               tuned_ratio=(tuned.tokens_per_s / best.tokens_per_s) if tuned and best and tuned.tokens_per_s else None,
               shipped_ratio=(_tps(sweep, b0) / best.tokens_per_s) if best and _tps(sweep, b0) else "OOM",
               verdict=plan.verdict.value, fit=plan.fit.to_dict() if plan.fit else None,
               fit_allocated=plan.fit_allocated.to_dict() if plan.fit_allocated else None,
               predicted_start_peak_alloc=(plan.fit_allocated.predict(tuned.batch * tuned.length, tuned.length)
                                           if plan.fit_allocated and tuned else None))
    return row


def verify(args, which: str, data: dict, out: Path, rows: list[dict]) -> dict:
    """Train from the tuned policy on the class's own data: no OOM, measured peak vs predicted."""
    name, profile = which.split(":")
    tag = f"{name}-{profile}"
    row = next(r for r in rows if r["class"] == name and r["profile"] == profile)
    user_out = out / "verify-out" / tag
    cmd = user_command(args, name, data[profile], user_out, with_batch=False)
    vram = [] if args.tiny else ["--vram-limit", CLASSES[name]]
    code, wall = oomguard(args, ["run", "--policy", row["policy_file"], "--start-from-policy", *vram, "--quiet",
                                 "--run-dir", str(out / "verify" / tag), "--", *cmd], out / f"verify-{tag}.log")
    events = [json.loads(line) for line in Path(str(user_out) + ".events.jsonl").read_text().splitlines()] \
        if Path(str(user_out) + ".events.jsonl").exists() else []
    steps = [e for e in events if e.get("event") == "step"]
    peaks = [e["peak"] for e in steps if e.get("peak")]
    run = json.loads((out / "verify" / tag / "run.json").read_text()) if (out / "verify" / tag / "run.json").exists() \
        else {}
    return {"which": which, "exit": code, "wall_s": round(wall, 1), "attempts": len(run.get("attempts", [])),
            "status": run.get("status"), "steps": len(steps), "measured_peak_alloc": max(peaks, default=None),
            "predicted_worst_peak_alloc": row.get("predicted_start_peak_alloc"),
            "batches": [e.get("batch") for e in events if e.get("event") == "train_begin"]}


def table(rows: list[dict]) -> str:
    lines = ["class      profile  exit  tune_s  shipped  tuned  best   tuned/best  shipped/best  fit max/rms/loo"]
    for r in rows:
        fit = r.get("fit") or {}
        errs = "/".join(f"{fit[k]:.1%}" if fit.get(k) is not None else "-"
                        for k in ("max_rel_error", "rms_rel_error", "loo_max_rel_error")) if fit else "-"
        ratio = r.get("tuned_ratio")
        shipped_ratio = r.get("shipped_ratio") or "-"
        lines.append(f"{r['class']:<10} {r['profile']:<8} {r['exit']:<5} {r['tune_wall_s']:<7} "
                     f"{r.get('shipped') or '-':<8} {r.get('tuned') or '-':<6} {r.get('best') or '-':<6} "
                     f"{f'{ratio:.3f}' if ratio else '-':<11} "
                     f"{shipped_ratio if isinstance(shipped_ratio, str) else f'{shipped_ratio:.3f}':<13} {errs}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    args.model = args.model or ("/tmp/llama-tiny-random" if args.tiny else "/tmp/llama3-8b-random")
    build_model(args.model, "tiny" if args.tiny else "8b")
    rows_n = min(args.rows, 200) if args.tiny else args.rows
    profiles = {p: dict(PROFILES[p], target=64) if args.tiny else PROFILES[p] for p in args.profiles.split(",")}
    data = {p: write_dataset(out / "data" / f"{p}.jsonl", sample_lengths(rows_n, seed=7, **kw), seed=7)
            for p, kw in profiles.items()}
    result = {"versions": versions(), "argv": sys.argv[1:], "rows": []}
    late = lambda: args.deadline is not None and time.monotonic() - started > args.deadline  # noqa: E731
    for profile in data:
        for name in args.classes.split(","):
            if late():
                result.setdefault("skipped", []).append(f"{name}:{profile} (deadline)")
                continue
            row = measure(args, name, profile, data[profile], out)
            result["rows"].append(row)
            (out / "bench_tune.json").write_text(json.dumps(result, indent=2, default=str))
            print(table([row]).splitlines()[-1], flush=True)
            if row["exit"] != 0 and len(result["rows"]) == 1:
                print(f"bench: the first tune failed (exit {row['exit']}); see {out}/tune-*.log", flush=True)
                return 1
    if args.verify and not late():
        result["verify"] = verify(args, args.verify, data, out, result["rows"])
    result["wall_s"] = round(time.monotonic() - started, 1)
    (out / "bench_tune.json").write_text(json.dumps(result, indent=2, default=str))
    print(table(result["rows"]))
    if result.get("verify"):
        print("verify:", json.dumps(result["verify"]))
    if result.get("skipped"):
        print("skipped:", ", ".join(result["skipped"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
