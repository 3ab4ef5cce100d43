"""Recovery benchmark: Llama-3-8B-shaped QLoRA under emulated cards, three ways side by side.

Each scenario runs the same user script (scripts/bench_train.py) three ways:
  plain     HF as is: the first OOM ends the run;
  auto      HF ``auto_find_batch_size=True``;
  oomguard  ``python -m oomguard run --policy P --vram-limit CAP -- python scripts/bench_train.py …``.
The card is emulated with the same VRAM cap in all three (oomguard's apply_vram_limit: the CUDA
context counts against the card). Then ``sweep`` measures tokens/s of every final configuration
next to a grid of configurations at the requested length and effective batch, in one process per
cap, so "final / best that fits" is a ratio measured side by side on one GPU.

    python scripts/bench_common.py --out /tmp/llama3-8b-random          # the model, once
    python scripts/bench_recovery.py run --model /tmp/llama3-8b-random --out R.json --scenarios a,b
    python scripts/bench_recovery.py sweep --model … --out S.json --finals R.json [--caps 24GiB]
    python scripts/bench_recovery.py report R1.json R2.json S.json … > tables.md

``--tiny`` shrinks every scenario (steps, lengths) for a CPU dry run of the plumbing; there is no
cap on CPU, so nothing fails there unless ``--inject`` makes oomguard inject one.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_common  # noqa: E402

from oomguard.protocol import read_jsonl  # noqa: E402

POLICIES = ROOT / "oomguard" / "policies"
WAYS = ("oomguard", "plain", "auto")  # run order: the one under test first
# also: "clean" = plain from scratch at the learning rate and precision the oomguard way ended with (issue 19 b);
# "plain_es" = plain with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the allocator
# setting oomguard gives its child (separates that effect from the ladder's)
ES = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    cap: str
    policy: str
    seq: int
    batch: int
    accum: int = 1
    precision: str = "bf16"
    trainer: str = "sft"
    learning_rate: float = 2e-4
    leak: bool = False
    max_steps: int = 4
    save_steps: int = 2
    timeout_s: int = 420

    @property
    def effective(self) -> int:
        return self.batch * self.accum

    def examples(self) -> int:
        return max(64, 2 * self.max_steps * self.effective)


SCENARIOS = {s.name: s for s in (
    Scenario("a", "24 GiB card, batch 8 x 2048, bf16", "24GiB", "rtx-24gb", 2048, 8),
    Scenario("a2", "24 GiB card, batch 16 x 2048, bf16", "24GiB", "rtx-24gb", 2048, 16),
    Scenario("b", "24 GiB card, batch 2 x 8192, bf16", "24GiB", "rtx-24gb", 8192, 2),
    # a "16 GB" T4 shows 15 GiB to torch; the T4 user follows the older HF Trainer notebook (full logits)
    Scenario("c", "T4-like 16 GB card (15 GiB), batch 4 x 1024, fp16, HF Trainer", "15GiB", "t4-16gb", 1024, 4,
             precision="fp16", trainer="hf", max_steps=6),
    Scenario("leak", "24 GiB card, 2 x 2048, the script leaks activations", "24GiB", "rtx-24gb", 2048, 2,
             leak=True, max_steps=30, save_steps=10),
    Scenario("nan", "24 GiB card, fp16, learning rate 3000 (a typo for 3e-4)", "24GiB", "rtx-24gb", 1024, 2,
             precision="fp16", learning_rate=3000.0, max_steps=10, save_steps=2),
    # issue 19 (b): a learning rate 100x the QLoRA default that trains, then diverges; the "clean" way runs
    # the same script from scratch at the learning rate oomguard recovered to, for the loss to compare
    Scenario("lr100", "24 GiB card, bf16, learning rate 2e-2 (100x QLoRA's 2e-4)", "24GiB", "rtx-24gb", 1024, 2,
             learning_rate=2e-2, max_steps=40, save_steps=4, timeout_s=600),
)}


def tiny(s: Scenario) -> Scenario:
    """The CPU dry run's version of ``s`` (fp16 AMP needs CUDA: bf16 there)."""
    return dataclasses.replace(s, seq=max(64, s.seq // 32), max_steps=min(s.max_steps, 6),
                               save_steps=min(s.save_steps, 2), timeout_s=300,
                               precision="bf16" if s.precision == "fp16" else s.precision)


# --- one way of one scenario -------------------------------------------------------------------------------
def user_args(s: Scenario, model: str, data: Path, out: Path, events: Path) -> list[str]:
    return ["--model", model, "--dataset", str(data), "--output_dir", str(out), "--events", str(events),
            "--max_seq_length", str(s.seq), "--per_device_train_batch_size", str(s.batch),
            "--gradient_accumulation_steps", str(s.accum), f"--{s.precision}", "--learning_rate",
            str(s.learning_rate), "--max_steps", str(s.max_steps), "--save_steps", str(s.save_steps),
            "--trainer", s.trainer, *(["--leak"] if s.leak else [])]


def command(way: str, s: Scenario, model: str, data: Path, work: Path, inject: str | None) -> list[str]:
    py = sys.executable
    script = [py, str(HERE / "bench_train.py"), *user_args(s, model, data, work / "out", work / "events.jsonl")]
    if way in ("plain", "plain_es", "clean"):
        return [*script, "--vram_limit", s.cap]
    if way == "auto":
        return [*script, "--vram_limit", s.cap, "--auto_find_batch_size"]
    return [py, "-m", "oomguard", "run", "--policy", str(POLICIES / f"{s.policy}.yaml"), "--run-dir",
            str(work / "run"), "--vram-limit", s.cap, "--quiet", *(["--inject", inject] if inject else []),
            "--", *script]


def run_way(way: str, s: Scenario, model: str, data: Path, work: Path, inject: str | None) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = command(way, s, model, data, work, inject if way == "oomguard" else None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           **(ES if way == "plain_es" else {})}
    started = time.time()
    with open(work / "stdout.log", "w") as out, open(work / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=s.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = None
            proc.wait()
    result = {"way": way, "rc": rc, "timed_out": rc is None, "wall_s": round(time.time() - started, 1),
              "command": " ".join(cmd)}
    result.update(measure(way, s, work))
    result["stderr_tail"] = (work / "stderr.log").read_text(errors="replace")[-1500:]
    print(f"bench: {s.name}/{way}: rc={rc} finished={result['finished']} final={result.get('final')} "
          f"wall={result['wall_s']}s", flush=True)
    return result


def read_events(path: Path) -> list[dict]:
    return list(read_jsonl(path))  # a line torn by a kill is skipped


def measure(way: str, s: Scenario, work: Path) -> dict:
    """What the issue asks for, from the script's events (and oomguard's journal)."""
    ev = read_events(work / "events.jsonl")
    steps = [e for e in ev if e["event"] == "step"]
    begins = [e for e in ev if e["event"] == "train_begin"]
    ends = [e for e in ev if e["event"] == "end"]
    last_end = ends[-1] if ends else {}
    final = {"per_device_train_batch_size": s.batch, "gradient_accumulation_steps": s.accum,
             "max_seq_length": s.seq, "lora_r": 16, "precision": s.precision, "learning_rate": s.learning_rate}
    out: dict = {"errors": [e.get("error") for e in ends if not e.get("ok")]}
    if way == "auto" and begins:
        final["per_device_train_batch_size"] = begins[-1]["batch"]
        out["restarts"] = len(begins) - 1
        out["steps_lost"] = sum(_max_step_between(steps, b, n) for b, n in zip(begins, begins[1:]))
        out["failure_to_next_step_s"] = [_first_step_after(steps, b["time"]) for b in begins[1:]]
    if way == "oomguard" and (work / "run" / "run.json").exists():
        from oomguard.report.summary import summarize

        summary = summarize(work / "run")
        final.update({k: v for k, v in summary.final.items() if k in final})
        out["status"] = summary.status
        out["attempts"] = summary.attempts
        out["root_cause"] = summary.root_cause
        out["recoveries"] = [dataclasses.asdict(r) for r in summary.recoveries]
        out["steps_lost"] = sum(r.steps_redone or 0 for r in summary.recoveries)
        out["failure_to_next_step_s"] = [r.seconds_to_next_step for r in summary.recoveries]
        out["events"] = _journal_highlights(work / "run")
    if way.startswith("plain") and not last_end.get("ok"):
        out["crashed_at_step"] = max((e["step"] for e in steps), default=0)
    final["effective_batch"] = final["per_device_train_batch_size"] * final["gradient_accumulation_steps"]
    done = max((e["step"] for e in steps), default=0)
    logged = [e["loss"] for e in ev if e["event"] == "loss"]
    tail = [x for x in logged[-5:] if isinstance(x, (int, float)) and x == x and abs(x) != float("inf")]
    out["loss_tail_mean"] = round(sum(tail) / len(tail), 4) if tail else None  # mean of the last 5 logged
    out.update(final=final, final_step=done, losses=logged[-3:],
               weights_finite=last_end.get("weights_finite"), tokens_per_s_in_run=_run_tps(steps),
               step_peak_allocated_gib=_peak(steps))
    # the logged loss hides NaN (logging_nan_inf_filter); count the raw non-finite micro-batch losses
    out["nonfinite_steps"] = sum(1 for e in steps if e.get("nonfinite"))
    last_ok = bool(steps) and not steps[-1].get("nonfinite")
    out["finished"] = bool(last_end.get("ok") and done >= s.max_steps and last_end.get("weights_finite")
                           and last_end.get("loss_finite") and last_ok)
    return out


def _max_step_between(steps: list[dict], begin: dict, nxt: dict) -> int:
    return max((e["step"] for e in steps if begin["time"] <= e["time"] < nxt["time"]), default=0) - begin["step"]


def _first_step_after(steps: list[dict], t: float) -> float | None:
    return next((round(e["time"] - t, 1) for e in steps if e["time"] > t), None)


def _run_tps(steps: list[dict]) -> float | None:
    """Non-padding tokens/s of the last process's steps after its first (warm-up) step."""
    return _tokens_per_s([e for e in steps if e["pid"] == steps[-1]["pid"]][1:]) if steps else None


def _peak(steps: list[dict]) -> float | None:
    vals = [e["peak"] for e in steps if e.get("peak")]
    return round(max(vals) / 2**30, 2) if vals else None


def _journal_highlights(run_dir: Path) -> list[dict]:
    keep = {"memory_growth", "pressure_save", "emergency_save", "decision", "resume_position_inexact",
            "nan_detected", "vram_limit", "checkpoint_skipped"}
    return [{k: v for k, v in e.items() if k not in ("knobs_before",)}
            for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") in keep][:30]


# --- scenarios ----------------------------------------------------------------------------------------------
def dataset_for(s: Scenario, root: Path) -> tuple[Path, list[int]]:
    lengths = bench_common.sample_lengths(s.examples(), s.seq, seed=len(s.name) * 1000 + s.seq)
    return bench_common.write_dataset(root / f"{s.name}.jsonl", lengths, seed=s.seq), lengths


def run_scenarios(args) -> None:
    out = Path(args.out)
    work = Path(args.work)
    results = {"versions": bench_common.versions(), "command": " ".join(sys.argv), "scenarios": {}}
    for name in args.scenarios.split(","):
        s = tiny(SCENARIOS[name]) if args.tiny else SCENARIOS[name]
        data, lengths = dataset_for(s, work / "data")
        entry = {"spec": dataclasses.asdict(s), "examples": len(lengths), "tokens": sum(lengths) + len(lengths),
                 "ways": {}}
        results["scenarios"][name] = entry
        prior = json.loads(Path(args.prior).read_text())["scenarios"].get(name, {}) if args.prior else {}
        for way, r in prior.get("ways", {}).items():  # an earlier run's ways (the clean way reads its final LR)
            if way not in args.ways.split(","):
                entry["ways"][way] = {**r, "from": args.prior}
        for way in args.ways.split(","):
            if args.deadline and time.time() > args.deadline:
                entry["ways"][way] = {"way": way, "skipped": "deadline (GPU time) passed before it started"}
                continue
            ran = s
            if way == "clean":  # from scratch at the learning rate oomguard ended with (none: nothing to compare)
                final = entry["ways"].get("oomguard", {}).get("final", {})
                lr = final.get("learning_rate")
                if lr is None or lr == s.learning_rate:
                    entry["ways"][way] = {"way": way, "skipped": f"oomguard's final learning rate is {lr}"}
                    continue
                ran = dataclasses.replace(s, learning_rate=float(lr), precision=final.get("precision", s.precision))
            r = run_way(way, ran, args.model, data, work / name / way, args.inject)
            r["truncated_share"] = round(bench_common.truncation_share(lengths, r["final"]["max_seq_length"]), 4)
            entry["ways"][way] = r
            out.write_text(json.dumps(results, indent=1))  # after every way: a timeout keeps what ran
    print(f"bench: wrote {out}", flush=True)


# --- sweep: tokens/s of configurations under one cap, in one process ------------------------------------
def sweep_plan(finals: list[dict], tiny_run: bool) -> dict[tuple, list[dict]]:
    """Per (cap, trainer, precision): the grid at each requested shape plus every final configuration."""
    plan: dict[tuple, list[dict]] = {}
    for s in SCENARIOS.values():
        if s.leak or s.learning_rate > 1:
            continue  # the leak and NaN scenarios are not about fitting
        s = tiny(s) if tiny_run else s
        key = (s.cap, s.trainer, s.precision)
        grid = plan.setdefault(key, [])
        b = s.effective
        while b >= max(1, s.effective // 8):  # accumulation up to 8: smaller micro-batches only get slower
            grid.append({"scenario": s.name, "batch": b, "accum": s.effective // b, "seq": s.seq, "grid": True})
            b //= 2
    for f in finals:
        key = (f["cap"], f["trainer"], f["precision"])
        if not any(c["scenario"] == f["scenario"] for c in plan.get(key, [])):
            continue  # the leak and NaN scenarios are not about fitting
        cfg = {"scenario": f["scenario"], "batch": f["batch"], "accum": f["accum"], "seq": f["seq"], "grid": False,
               "way": f["way"]}
        if key in plan and not any(_same(cfg, c) for c in plan[key]):
            plan[key].append(cfg)
    return plan


def _same(a: dict, b: dict) -> bool:
    return (a["batch"], a["accum"], a["seq"]) == (b["batch"], b["accum"], b["seq"])


def finals_from(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        for name, entry in json.loads(Path(p).read_text()).get("scenarios", {}).items():
            spec = entry["spec"]
            for way, r in entry["ways"].items():
                if "final" not in r:
                    continue
                f = r["final"]
                out.append({"scenario": name, "way": way, "cap": spec["cap"], "trainer": spec["trainer"],
                            "precision": f["precision"], "batch": f["per_device_train_batch_size"],
                            "accum": f["gradient_accumulation_steps"], "seq": f["max_seq_length"]})
    return out


def run_sweeps(args) -> None:
    plan = sweep_plan(finals_from(args.finals or []), args.tiny)
    caps = set(args.caps.split(",")) if args.caps else None
    results = {"versions": bench_common.versions(), "command": " ".join(sys.argv), "sweeps": []}
    work = Path(args.work)
    for (cap, trainer, precision), configs in plan.items():
        if caps and cap not in caps:
            continue
        spec = {"cap": cap, "trainer": trainer, "precision": precision, "configs": configs}
        spec_file = work / f"sweep-{cap}-{trainer}-{precision}.json"
        spec_file.parent.mkdir(parents=True, exist_ok=True)
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "sweep-worker", "--model", args.model, "--spec", str(spec_file),
               "--work", str(work), *(["--tiny"] if args.tiny else [])]
        started = time.time()
        # the allocator setting oomguard's child gets: "fits" means fits at its best
        proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=args.timeout_s,
                              env={**os.environ, **ES})
        rows = json.loads(spec_file.with_suffix(".out.json").read_text()) if spec_file.with_suffix(
            ".out.json").exists() else []
        results["sweeps"].append({**{k: v for k, v in spec.items() if k != "configs"}, "rows": rows,
                                  "rc": proc.returncode, "wall_s": round(time.time() - started, 1),
                                  "stderr_tail": proc.stderr[-1500:]})
        Path(args.out).write_text(json.dumps(results, indent=1))
        for r in rows:
            print(f"bench: sweep {cap} {r['scenario']} {r['batch']}x{r['seq']}x{r['accum']}: "
                  f"fits={r['fits']} tps={r.get('tokens_per_s')}", flush=True)


def sweep_worker(args) -> None:
    """Load the model once under the cap; a few optimizer steps per configuration."""
    import bench_train
    import torch

    from oomguard.guard import apply_vram_limit
    from oomguard.protocol import parse_size

    spec = json.loads(Path(args.spec).read_text())
    apply_vram_limit(parse_size(spec["cap"]), run_dir=None)
    data_root = Path(args.work) / "data"
    out_path = Path(args.spec).with_suffix(".out.json")
    rows, model, tokenizer = [], None, None
    for cfg in spec["configs"]:
        s = SCENARIOS[cfg["scenario"]]
        s = tiny(s) if args.tiny else s
        data, _ = dataset_for(s, data_root)
        events = Path(args.work) / f"sweep-{os.getpid()}.jsonl"
        events.unlink(missing_ok=True)
        argv = user_args(dataclasses.replace(s, seq=cfg["seq"], batch=cfg["batch"], accum=cfg["accum"],
                                             max_steps=3, save_steps=1000, leak=False),
                         args.model, data, Path(args.work) / "sweep-out", events)
        uargs = bench_train.parse_args(argv)
        if model is None:
            model, tokenizer = bench_train.load_model(uargs)
        row = dict(cfg)
        trainer = None
        try:
            trainer = bench_train.build_trainer(uargs, model, tokenizer)
            bench_train.fp32_adapter(trainer.model)
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
            trainer.train()
            row["fits"] = True
        except torch.OutOfMemoryError as exc:
            row["fits"], row["error"] = False, str(exc).splitlines()[0][:200]
        steps = [e for e in read_events(events) if e["event"] == "step"]
        row["tokens_per_s"] = _tokens_per_s(steps) if row["fits"] else None
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) \
            if torch.cuda.is_available() else None
        rows.append(row)
        out_path.write_text(json.dumps(rows, indent=1))
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tokens_per_s(steps: list[dict]) -> float | None:
    """Tokens/s over the steps after the first (warm-up): tokens of steps 2..n over their span."""
    if len(steps) < 2:
        return None
    span = steps[-1]["time"] - steps[0]["time"]
    return round(sum(e["tokens"] for e in steps[1:]) / span, 1) if span > 0 else None


# --- report ---------------------------------------------------------------------------------------------
def report(args) -> None:
    """Markdown tables from result files; a later file's way of a scenario replaces an earlier one."""
    runs: dict[str, dict] = {}
    rows: dict[tuple, dict] = {}
    for p in args.files:
        data = json.loads(Path(p).read_text())
        for name, entry in data.get("scenarios", {}).items():
            mine = runs.setdefault(name, {"spec": entry["spec"], "ways": {}})
            for way, r in entry["ways"].items():
                if "skipped" not in r:
                    mine["ways"][way] = {**r, "source": Path(p).stem}
        for sw in data.get("sweeps", []):
            for r in sw["rows"]:
                rows[(r["scenario"], r["batch"], r["accum"], r["seq"])] = r
    print("| scenario | way | finished | batch x accum (eff.) | max_seq_length | lora_r | precision | "
          "tokens cut | steps lost | failure -> next step (s) | tokens/s | / best that fits | result file |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in runs.items():
        for way in sorted(entry["ways"], key=lambda w: (w != "oomguard", w)):
            r = entry["ways"][way]
            f = r["final"]
            done, why = _verdict(r)
            tps, ratio = _final_tps(list(rows.values()), name, f) if done else (None, None)
            lost = r.get("steps_lost", "-" if r["finished"] else f"all ({r.get('crashed_at_step', '?')} done)")
            times = ", ".join(f"{t:.0f}" for t in r.get("failure_to_next_step_s") or [] if t is not None) or "-"
            print(f"| {name} | {way} | {why} | {f['per_device_train_batch_size']} x "
                  f"{f['gradient_accumulation_steps']} ({f['effective_batch']}) | {f['max_seq_length']} | "
                  f"{f['lora_r']} | {f['precision']} | {100 * r['truncated_share']:.1f} % | {lost} | {times} | "
                  f"{tps or '-'} | {ratio or '-'} | {r['source']} |")
    if rows:
        print("\n| sweep: scenario | batch x accum x length | fits | tokens/s | step peak allocated (GiB) |")
        print("|---|---|---|---|---|")
        for r in rows.values():
            print(f"| {r['scenario']}{'' if r['grid'] else ' (final of ' + r.get('way', '?') + ')'} | "
                  f"{r['batch']} x {r['accum']} x {r['seq']} | {'yes' if r['fits'] else 'no'} | "
                  f"{r.get('tokens_per_s') or '-'} | {r.get('peak_allocated_gib') or '-'} |")


def _verdict(r: dict) -> tuple[bool, str]:
    """Finished or not, in words. Results written before the raw non-finite count existed are
    judged by their logged losses: exactly 0.0 is what ``logging_nan_inf_filter`` logs for NaN."""
    losses = r.get("losses") or []
    if r["finished"] and r.get("nonfinite_steps") is None and losses and all(x == 0.0 for x in losses):
        return False, "NO: ran to the end on NaN losses (logged as 0.0)"
    if r["finished"]:
        return True, "yes"
    if r.get("status") in ("failed", "gave_up"):
        return False, f"NO: gave up after {r.get('attempts')} attempts"
    return False, "NO" + (f": {r['errors'][-1].split(':')[0]}" if r.get("errors") else "")


def _final_tps(rows: list[dict], scenario: str, final: dict) -> tuple[float | None, str | None]:
    """The final configuration's tokens/s and its ratio to the best grid configuration that fits.
    A configuration is matched on (batch, accumulation, length), else on (batch, length): tokens/s
    is a property of the micro-batch, accumulation only repeats it."""
    mine = [r for r in rows if r["scenario"] == scenario]
    key = (final["per_device_train_batch_size"], final["gradient_accumulation_steps"], final["max_seq_length"])
    match = next((r for r in mine if (r["batch"], r["accum"], r["seq"]) == key), None) or \
        next((r for r in mine if (r["batch"], r["seq"]) == (key[0], key[2]) and r.get("tokens_per_s")), None)
    fitting = [r["tokens_per_s"] for r in mine if r["grid"] and r["fits"] and r.get("tokens_per_s")]
    if not match or not match.get("tokens_per_s"):
        return None, None
    best = max(fitting) if fitting else None
    return match["tokens_per_s"], (f"{match['tokens_per_s'] / best:.2f}" if best else "no grid config fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/bench-recovery")
    r.add_argument("--scenarios", default=",".join(SCENARIOS))
    r.add_argument("--ways", default=",".join(WAYS))
    r.add_argument("--inject", default=None, help="oomguard --inject (CPU dry runs)")
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--deadline", type=float, default=None, help="epoch seconds: start no way after it")
    r.add_argument("--prior", default=None, help="an earlier run's results: its ways not run now are kept "
                   "(marked with 'from'), e.g. the oomguard way whose final LR the clean way trains at")
    sw = sub.add_parser("sweep")
    sw.add_argument("--model", required=True)
    sw.add_argument("--out", required=True)
    sw.add_argument("--work", default="/tmp/bench-recovery")
    sw.add_argument("--finals", nargs="*", help="run results whose final configurations to measure too")
    sw.add_argument("--caps", default=None, help="only these caps, comma separated")
    sw.add_argument("--timeout_s", type=int, default=560)
    sw.add_argument("--tiny", action="store_true")
    w = sub.add_parser("sweep-worker")
    w.add_argument("--model", required=True)
    w.add_argument("--spec", required=True)
    w.add_argument("--work", required=True)
    w.add_argument("--tiny", action="store_true")
    rep = sub.add_parser("report")
    rep.add_argument("files", nargs="+")
    args = ap.parse_args()
    {"run": run_scenarios, "sweep": run_sweeps, "sweep-worker": sweep_worker, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
