"""The guard's own per-step cost, old vs new NaN check and monitor side by side, and the failed
child's time from its error record to its exit, with and without the fast exit (issue 17 items 2-3).

    python scripts/bench_guard.py --model /tmp/llama3-8b-random --arch 8b --out /tmp/guard --steps 50 --exit-runs 2
    python scripts/bench_guard.py --model /tmp/bench-tiny --arch tiny --shape 2x64 --out /tmp/guard \\
        --steps 6 --exit-runs 1                                              # CPU dry run

**Per-step cost** (worker ``cost``, one process, the model loaded once with the recipe's pieces as
``bench_overhead.Bench`` does): ONE TRL ``SFTTrainer`` carries two full guard sets, each callback behind
a gate, and every optimizer step runs under one of three configurations, in a random order within
each block of three consecutive steps:

- ``bare``: no guard callback runs (the gates are shut) and no loss is handed over;
- ``old``: the guard as it was before this change (the NaN check reading every LoRA gradient's norm
  back to the host before ``optimizer.step()``; full ``torch.cuda.memory_stats()``, NVML and psutil
  every step, copied below from the previous code);
- ``new``: ``guard_callbacks()`` as shipped now, the loss handed over from ``training_step`` as
  ``guarded_train`` does.

A step's cycle is ``on_step_begin(k) -> on_step_begin(k+1)`` on the host clock, read by the first
callback with no device sync (the step syncs by itself where the Trainer reads the loss). The cost
of a configuration is its median cycle over the bare one's, with a bootstrap 95 % interval, and per
block (the paired difference of neighbouring steps, which cancels drift). ``new`` also runs the sample
ledger as ``prepare_resume`` installs it (its ``training_step`` wrapper with the culprit's in-flight record,
one ledger line per step; its sampler wrapper records every row in all three configurations); the tracker
callback is not installed (``report_to`` none, as in the recipe's default: it adds nothing then). Each gated
callback event's host time is kept per configuration, and per step the guard's whole host time (the gated
events, the hand-over, the ledger's part of ``training_step``): its mean over the bare median cycle, with a
bootstrap 95 % interval, is the guard's cost where the step is host-bound. The per-step garbage-collector
time, the main thread's CPU time and the wall cycle's spread are reported to show where the step-to-step
jitter comes from.

**Exit** (worker ``die``, one process per run): the same model, a guarded SFTTrainer, a NaN in step
3's forward; the NaN guard stops before step 3's update, ``die()`` writes the error record and
exits. The parent reads the ``error_recorded`` event's time, the child's exit (``waitpid``) and the
moment NVML shows its memory gone (``supervisor.gpu.wait_gpu_released``, as the supervisor waits),
for ``OOMGUARD_FAST_EXIT`` on and off, alternating. The error record's ``last_finite_step`` (2) and
step (2) are checked: the new NaN check on this device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent))

CONFIGS = ("bare", "old", "new")
WARMUP = ("old", "new", "bare", "old", "new", "bare")  # every path once before measuring (lazy inits)
BOOTSTRAP = 2000
SHAPES = {"8b": "2x1024", "tiny": "8x256"}


# --- the parent ------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.worker == "cost":
        return run_cost(args)
    if args.worker == "die":
        return run_die(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict = {"command": shlex.join(["python", "scripts/bench_guard.py", *sys.argv[1:]])}
    rc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", "cost"]).returncode
    cost_file = out / "cost.json"
    result["cost"] = json.loads(cost_file.read_text()) if cost_file.exists() else {"exit_code": rc}
    result["exit"] = exit_runs(args, out, started)
    (out / "guard.json").write_text(json.dumps(result, indent=1))
    print_summary(result)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (built there by bench_common if absent)")
    ap.add_argument("--arch", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--shape", help="BATCHxMAX_LENGTH (default 2x1024 for 8b, 8x256 for tiny)")
    ap.add_argument("--out", required=True, help="folder for cost.json, guard.json and the runs")
    ap.add_argument("--steps", type=int, default=50, help="measured steps per configuration")
    ap.add_argument("--exit-runs", type=int, default=2, help="dying children per exit mode")
    ap.add_argument("--optim", help="the Trainer's optimizer instead of the recipe's (paged_adamw_32bit on CUDA)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip exit runs that would start after this")
    ap.add_argument("--worker", choices=("cost", "die"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    return ap.parse_args()


def shape(args) -> tuple[int, int]:
    batch, length = (args.shape or SHAPES[args.arch]).split("x")
    return int(batch), int(length)


# --- exit runs (parent side) -----------------------------------------------------------------------
def exit_runs(args, out: Path, started: float) -> dict:
    from oomguard.supervisor.gpu import wait_gpu_released

    runs = []
    for i in range(args.exit_runs * 2):
        fast = i % 2 == 0
        if time.monotonic() - started > args.budget_s:
            print(f"bench_guard: exit run {i} skipped (budget)", flush=True)
            break
        run_dir = out / f"die-{i}-{'fast' if fast else 'ordinary'}"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OOMGUARD_FAST_EXIT": "1" if fast else "0"}
        with (run_dir / "stderr.log").open("wb") as err:
            child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", "die",
                                      "--run-dir", str(run_dir)], env=env, stdout=err, stderr=err)
            rc = child.wait()
        exited = time.time()
        released, waited = wait_gpu_released([child.pid], 60.0, poll_s=0.005)
        recorded = [e["time"] for e in read_events(run_dir) if e.get("event") == "error_recorded"]
        record = json.loads((run_dir / "error.json").read_text()) if (run_dir / "error.json").exists() else {}
        run = {"fast": fast, "exit_code": rc, "record_to_exit_s": exited - recorded[0] if recorded else None,
               "exit_to_gpu_free_s": waited, "gpu_released": released, "kind": record.get("kind"),
               "step": record.get("step"), "last_finite_step": record.get("last_finite_step")}
        runs.append(run)
        print(f"bench_guard: exit run {i}: {run}", flush=True)
    summary = {}
    for fast in (True, False):
        times = [r["record_to_exit_s"] for r in runs if r["fast"] is fast and r["record_to_exit_s"] is not None]
        if times:
            summary["fast" if fast else "ordinary"] = {"median_s": statistics.median(times), "runs_s": times}
    return {"runs": runs, "summary": summary}


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --- shared: the model and one trainer ------------------------------------------------------------
def load_bench(args, max_steps: int, tmp: Path):
    """bench_overhead's Bench: the recipe's model loading and SFT config, the data at max length."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from oomguard.guard import apply_allocator_defaults

    apply_allocator_defaults()
    import warnings

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    warnings.filterwarnings("ignore", message=".*needs CUDA and none is available.*")
    import dataclasses

    import bench_common
    import bench_overhead

    model_dir = str(bench_common.build_model(args.model, args.arch))
    batch, length = shape(args)
    bench = bench_overhead.Bench(args.arch, model_dir, batch, length, 1, max_steps, tmp)
    if args.optim:
        bench.device = dataclasses.replace(bench.device, optim=args.optim)
    return bench


def new_trainer(bench, callbacks):
    from transformers import set_seed
    from trl import SFTTrainer

    from oomguard.recipes.model import trainable_to_fp32

    set_seed(bench.options.seed)
    trainer = SFTTrainer(model=bench.model, args=bench.config(), train_dataset=bench.dataset,
                         processing_class=bench.tokenizer, callbacks=callbacks)
    trainable_to_fp32(trainer.model)
    trainer._oomguard_raw_dataset = bench.dataset
    return trainer


# --- the cost worker --------------------------------------------------------------------------------
def run_cost(args) -> None:
    import tempfile

    out = Path(args.out)
    os.environ["OOMGUARD_SUPERVISOR_PID"] = str(os.getppid())
    schedule = list(WARMUP)
    rng = random.Random(0)
    for _ in range(args.steps):
        block = list(CONFIGS)
        rng.shuffle(block)
        schedule += block
    with tempfile.TemporaryDirectory(prefix="bench-guard-") as tmp:
        tmp = Path(tmp)
        bench = load_bench(args, len(schedule) + 1, tmp)
        result = measure_steps(bench, schedule, tmp)
        result["calls"] = call_costs()
        result["nan_check_on_device"] = device_nan_check(bench)
    import bench_common

    result.update(versions=bench_common.versions(), arch=args.arch, shape=args.shape or SHAPES[args.arch],
                  steps_per_config=args.steps, load_s=bench.load_s)
    (out / "cost.json").write_text(json.dumps(result, indent=1))
    print("bench_guard cost: done", flush=True)


def measure_steps(bench, schedule: list[str], tmp: Path) -> dict:
    import bench_overhead

    from oomguard.guard import GuardEnv, guard_callbacks
    from oomguard.guard.resume.ledger import install_ledger

    clock = Clock(schedule)
    env = {name: GuardEnv(run_dir=tmp / f"run-{name}") for name in ("old", "new")}
    for e in env.values():
        e.run_dir.mkdir()
    sets = {"new": guard_callbacks(env["new"]), "old": old_guard_callbacks(env["old"])}
    # one class per gate, named after what it gates: the Trainer warns about two callbacks of one class
    gates = [type(f"{name}_{type(cb).__name__}", (Gate,), {})(cb, name, clock) for name, cbs in sets.items()
             for cb in cbs]
    trainer = new_trainer(bench, [clock, *gates])
    nan = {name: next(cb for cb in cbs if hasattr(cb, "observe_loss")) for name, cbs in sets.items()}
    raw_step = trainer.training_step
    inner_s: list[float] = []  # the step itself, inside the ledger's wrapper (new's steps)
    # the sample ledger as prepare_resume installs it (its training_step wrapper, the culprit's in-flight
    # record, one ledger line per step): in "new" only; its sampler wrapper records every row in all three
    trainer.training_step = bench_overhead._timed(raw_step, inner_s)
    ledger = install_ledger(trainer, env["new"].run_dir)
    ledger_step = trainer.training_step
    handler = trainer.callback_handler
    handler.callbacks.remove(ledger)
    ledger_gate = type("new_SampleLedgerCallback", (Gate,), {})(ledger, "new", clock)
    handler.callbacks.insert(handler.callbacks.index(gates[-1]) + 1, ledger_gate)
    gates.append(ledger_gate)
    handed: dict[str, list[float]] = {name: [] for name in nan}
    busy_after: dict[str, list[bool]] = {name: [] for name in nan}

    def training_step(*a, **k):  # guarded_train's hand-over, for the configuration of this step
        if clock.config == "new":
            started = time.perf_counter()
            loss = ledger_step(*a, **k)
            clock.add_host(time.perf_counter() - started - inner_s.pop())  # the ledger's own part
        else:
            loss = raw_step(*a, **k)
        if clock.config in nan:
            marker = gpu_marker()
            started = time.perf_counter()
            nan[clock.config].observe_loss(loss)
            took = time.perf_counter() - started
            clock.add_host(took)
            handed[clock.config].append(took)
            if marker is not None:  # the GPU still had the backward to run: the hand-over cost no GPU time
                busy_after[clock.config].append(not marker.query())
        return loss

    trainer.training_step = training_step
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    cycles, host = clock.cycles(), clock.per_step_host()
    result = {"train_s": train_s, "steps_done": trainer.state.global_step, "cycles": cycles,
              "cpu": clock.cycles(clock.cpu_begins), "gc": clock.cycles(clock.gc_begins), "guard_host": host,
              "summary": summarize(cycles, clock.blocks(len(WARMUP))),
              "host_summary": summarize_host(host, cycles),
              "jitter": jitter(clock),
              "events_ms": gate_costs(gates),
              "observe_loss_ms": {k: statistics.median(v) * 1e3 for k, v in handed.items() if v},
              "gpu_busy_after_observe_loss": {k: sum(v) / len(v) for k, v in busy_after.items() if v},
              "gpu_idle_in_pre_optimizer_step": {g.name: sum(g.idle) / len(g.idle) for g in gates if g.idle},
              "optim": bench.device.optim, "ledger_lines": len(read_lines(ledger.path)),
              "nan_new": {"checks": nan["new"].checks, "ready_at_check": nan["new"].ready_at_check}}
    del trainer
    return result


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Clock:
    """First callback: at each step begin the host time, the main thread's CPU time and the time spent in
    Python's garbage collector so far, and the configuration of the step starting. The gates and the
    hand-over add the guard's host time of the step running (``add_host``)."""

    def __init__(self, schedule: list[str]):
        self.schedule, self.begins, self.config = schedule, [], "bare"
        self.cpu_begins: list[float] = []
        self.gc_begins: list[float] = []
        self.host: dict[int, float] = {}  # step index -> the guard's host seconds in it
        self._gc_total, self._gc_started = 0.0, None
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info):
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_total += time.perf_counter() - self._gc_started
            self._gc_started = None

    def __getattr__(self, name):  # every other event: nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        self.begins.append(time.perf_counter())
        self.cpu_begins.append(time.thread_time())
        self.gc_begins.append(self._gc_total)
        k = state.global_step
        self.config = self.schedule[k] if k < len(self.schedule) else "bare"

    def add_host(self, seconds: float) -> None:
        k = len(self.begins) - 1
        self.host[k] = self.host.get(k, 0.0) + seconds

    def cycles(self, marks: list[float] | None = None) -> dict[str, list[float]]:
        marks = self.begins if marks is None else marks
        out: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for k in range(len(WARMUP), len(marks) - 1):
            out[self.schedule[k]].append(marks[k + 1] - marks[k])
        return out

    def per_step_host(self) -> dict[str, list[float]]:
        """The guard's host seconds per measured step of each configuration (bare: 0)."""
        out: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for k in range(len(WARMUP), len(self.begins) - 1):
            out[self.schedule[k]].append(self.host.get(k, 0.0))
        return out

    def blocks(self, skip: int) -> list[dict[str, float]]:
        """Each block of three consecutive measured steps: configuration -> cycle."""
        blocks = []
        for b in range(skip, len(self.begins) - 3, 3):
            blocks.append({self.schedule[k]: self.begins[k + 1] - self.begins[k] for k in range(b, b + 3)})
        return [b for b in blocks if len(b) == 3]


def jitter(clock: Clock) -> dict:
    """Where the step-to-step spread is: wall cycle vs the main thread's CPU time vs the collector's time,
    and the correlation of neighbouring cycles (drift) — all configurations pooled."""
    def steps(marks):  # each measured step's share of a running mark, configurations pooled
        return [b - a for a, b in zip(marks[len(WARMUP):], marks[len(WARMUP) + 1:])]

    wall, cpu, gcs = steps(clock.begins), steps(clock.cpu_begins), steps(clock.gc_begins)
    if len(wall) < 4:
        return {}

    def q(xs, p):
        return sorted(xs)[int(p * (len(xs) - 1))] * 1e3

    def spread(xs):
        return {"q10_ms": q(xs, 0.1), "median_ms": q(xs, 0.5), "q90_ms": q(xs, 0.9),
                "sd_ms": statistics.stdev(xs) * 1e3}

    return {"wall": spread(wall), "cpu": spread(cpu), "gc": spread(gcs),
            "corr_wall_cpu": statistics.correlation(wall, cpu) if statistics.pstdev(cpu) else None,
            "lag1_autocorr_wall": statistics.correlation(wall[:-1], wall[1:]),
            "gc_share": sum(gcs) / sum(wall)}


def summarize_host(host: dict[str, list[float]], cycles: dict[str, list[float]]) -> dict:
    """The guard's host time per step of each configuration over the bare median cycle, with a bootstrap
    95 % interval that resamples both (the step is host-bound where the guard works: bench docs)."""
    rng = random.Random(1)
    bare = cycles.get("bare") or []
    out = {}
    for name in ("old", "new"):
        xs = host.get(name) or []
        if not xs or not bare:
            continue
        boot = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) / statistics.median(rng.choices(bare, k=len(bare)))
                      for _ in range(BOOTSTRAP))
        out[name] = {"mean_ms": statistics.fmean(xs) * 1e3, "median_ms": statistics.median(xs) * 1e3,
                     "share": statistics.fmean(xs) / statistics.median(bare),
                     "share_95": [boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]], "n": len(xs)}
    return out


ALWAYS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end")


class Gate:
    """A guard callback that runs only on the steps of its configuration (train/epoch events always)."""

    def __init__(self, inner, name: str, clock: Clock):
        self.inner, self.name, self.clock, self.times = inner, name, clock, {}
        self.idle: list[bool] = []  # NaN guards: did the GPU run dry during on_pre_optimizer_step

    def __getattr__(self, event):
        if not event.startswith("on_"):
            raise AttributeError(event)
        method = getattr(self.inner, event)

        def call(*a, **k):
            if event not in ALWAYS and self.clock.config != self.name:
                return None
            marker = gpu_marker() if event == "on_pre_optimizer_step" and hasattr(self.inner, "observe_loss") else None
            started = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                took = time.perf_counter() - started
                self.times.setdefault(event, []).append(took)
                if event not in ALWAYS:
                    self.clock.add_host(took)
                if marker is not None:
                    self.idle.append(bool(marker.query()))
        return call


def gpu_marker():
    """A CUDA event recorded now (None on CPU): ``query()`` later says whether the GPU got past it."""
    import torch

    if not torch.cuda.is_available():
        return None
    marker = torch.cuda.Event()
    marker.record()
    return marker


def gate_costs(gates: list[Gate]) -> dict:
    """Median host ms per call of each gated event, by configuration (per-step events only)."""
    out: dict = {}
    for g in gates:
        for event, times in g.times.items():
            if event in ALWAYS:
                continue
            out.setdefault(g.name, {})[f"{type(g.inner).__name__}.{event}"] = {
                "median_ms": statistics.median(times) * 1e3, "calls": len(times)}
    return out


def summarize(cycles: dict[str, list[float]], blocks: list[dict[str, float]]) -> dict:
    rng = random.Random(0)
    out = {c: {"median_ms": statistics.median(ts) * 1e3, "mean_ms": statistics.fmean(ts) * 1e3, "n": len(ts)}
           for c, ts in cycles.items() if ts}
    for a, b in (("bare", "old"), ("bare", "new"), ("old", "new")):
        if not cycles.get(a) or not cycles.get(b):
            continue
        boot = sorted(statistics.median(rng.choices(cycles[b], k=len(cycles[b])))
                      / statistics.median(rng.choices(cycles[a], k=len(cycles[a]))) - 1 for _ in range(BOOTSTRAP))
        diffs = [blk[b] - blk[a] for blk in blocks]
        base = statistics.median(cycles[a])
        paired = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) / base for _ in range(BOOTSTRAP)) \
            if diffs else []
        out[f"{b}_vs_{a}"] = {
            "ratio": statistics.median(cycles[b]) / base - 1,
            "bootstrap_95": [boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]],
            "paired_mean": statistics.fmean(diffs) / base if diffs else None,
            "paired_95": [paired[int(0.025 * BOOTSTRAP)], paired[int(0.975 * BOOTSTRAP) - 1]] if paired else None,
            "blocks": len(diffs)}
    return out


def device_nan_check(bench) -> dict:
    """The shipped NaN check on this device, outside the Trainer, ONE guard over three steps (its pinned
    byte and event reused): a clean backward passes and leaves every gradient bit for bit; a NaN backward
    is caught and its update dropped; the clean step after it passes again."""
    from types import SimpleNamespace

    import torch

    from oomguard.guard.callbacks.nan import NanGuardCallback

    model = bench.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    ids = torch.randint(0, 1000, (1, 256), device=device)
    guard = NanGuardCallback(skip_steps=5)
    guard.on_train_begin(SimpleNamespace(fp16=False), SimpleNamespace(global_step=0), None,
                         optimizer=SimpleNamespace(param_groups=[{"params": params}]))
    out = {}
    for step, (name, poison) in enumerate((("clean", None), ("nan", math.nan), ("clean_after", None))):
        model.zero_grad(set_to_none=True)
        skipped_before = guard.skipped
        loss = model(input_ids=ids, labels=ids).loss
        loss = loss * poison if poison is not None else loss
        loss.backward()
        before = [p.grad.clone() for p in params if p.grad is not None]
        guard.observe_loss(loss.detach())
        ready_at_once = guard.pending.ready() if guard.pending is not None else None
        guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model)
        after = [p.grad for p in params if p.grad is not None]
        same = len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
        out[name] = {"skipped": guard.skipped - skipped_before, "grads": len(before), "grads_bit_for_bit": same,
                     "verdict_ready_right_after_hand_over": ready_at_once}
    out["slots_reused"] = len(getattr(guard, "_slots", {}))  # session 8 code had none
    model.zero_grad(set_to_none=True)
    return out


def call_costs(n: int = 200) -> dict:
    """Host µs per call of what the monitor reads, old and new."""
    import torch

    from oomguard.guard.device import stats

    probes = {"new memory_stats (nested, 8 keys)": stats.memory_stats, "nvml_used": stats.nvml_used,
              "host_rss (psutil)": stats.host_rss}
    if torch.cuda.is_available():
        probes["torch.cuda.memory_stats (old)"] = torch.cuda.memory_stats
        probes["reset_peak_memory_stats"] = torch.cuda.reset_peak_memory_stats
    out = {}
    for name, fn in probes.items():
        fn()
        started = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - started) / n * 1e6
    return out


# --- the old guard, as it was before issue 17 item 3 (for the side-by-side) -----------------------
def old_guard_callbacks(env):
    """guard_callbacks() with the previous NaN check, monitor and cache clearer."""
    from oomguard.guard import guard_callbacks
    from oomguard.guard.callbacks import (
        CacheClearerCallback,
        MemoryMonitorCallback,
        NanGuardCallback,
        PressureCheckpointCallback,
    )

    cbs = guard_callbacks(env)
    monitor = OldMonitor(env.run_dir, rank=env.rank, cap_bytes=env.vram_limit)
    for i, cb in enumerate(cbs):
        if isinstance(cb, MemoryMonitorCallback):
            cbs[i] = monitor
        elif isinstance(cb, PressureCheckpointCallback):
            cbs[i] = PressureCheckpointCallback(monitor)
        elif isinstance(cb, CacheClearerCallback):
            cbs[i] = old_cache_clearer(env)
        elif isinstance(cb, NanGuardCallback):
            cbs[i] = OldNanGuard(env.run_dir, rank=env.rank, skip_steps=env.nan_skip_steps)
    return cbs


def _old_all_finite(grads, loss=None) -> bool:
    import torch

    from oomguard.guard import trainer_patches as internals

    norms = []
    if grads:
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        norms = [n.float().reshape(1) for n in internals.inf_norms(dense)]
    if loss is not None:
        norms.append(loss.detach().float().reshape(-1)[:1])
    if not norms:
        return True
    target = norms[0].device
    return bool(torch.cat([n.to(target) for n in norms]).isfinite().all())


def _old_classes():
    from oomguard.guard.callbacks import CacheClearerCallback, MemoryMonitorCallback, NanGuardCallback
    from oomguard.guard.callbacks.memory import sample_from_stats
    from oomguard.guard.callbacks.nan import NonFiniteLossError, drop_grads, trainable_grads
    from oomguard.guard.device import stats as device

    def full_stats():
        import torch

        if not device.cuda_available() or not torch.cuda.is_initialized():
            return {}
        return dict(torch.cuda.memory_stats())

    class OldNanGuard(NanGuardCallback):
        def observe_loss(self, loss):
            import torch

            if isinstance(loss, torch.Tensor):
                self.last_loss = loss.detach()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is None:
                return
            params = list(model.parameters())
            loss, self.last_loss = self.last_loss, None
            if getattr(args, "fp16", False) and (loss is None or _old_all_finite([], loss)):
                if loss is not None:
                    self.last_finite_step = state.global_step + 1
                return
            if _old_all_finite(trainable_grads(params), loss):
                self.last_finite_step = state.global_step + 1
                return
            drop_grads(params)
            self.skipped += 1
            stop = self.skipped > self.skip_steps
            self.journal.emit("nan_detected", step=state.global_step + 1, last_finite_step=self.last_finite_step,
                              skipped=self.skipped, action="stop" if stop else "skip")
            if stop:
                raise NonFiniteLossError(state.global_step, self.last_finite_step, self.skipped - 1)

    class OldMonitor(MemoryMonitorCallback):
        def take(self, step):
            sample = sample_from_stats(step, full_stats(), device_used=device.nvml_used(), host_rss=device.host_rss())
            if sample.reserved or not device.cuda_available():
                self.samples.append(sample)
            self._previous, self.latest = self.latest, sample
            return sample

        def _with_device_and_host(self, sample):
            return sample  # read every step already

    class OldCacheClearer(CacheClearerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not self._usable():
                return
            cur = sample_from_stats(state.global_step, full_stats())
            self.previous = cur

    return OldNanGuard, OldMonitor, OldCacheClearer


def OldNanGuard(*a, **k):  # noqa: N802 - a class made on first use (transformers imported by then)
    return _old_classes()[0](*a, **k)


def OldMonitor(*a, **k):  # noqa: N802
    return _old_classes()[1](*a, **k)


def old_cache_clearer(env):
    return _old_classes()[2](env.run_dir, rank=env.rank)


# --- the dying child ----------------------------------------------------------------------------------
def run_die(args) -> None:
    """Train under the guard until a NaN in step 3 stops it: die() records it and exits (never returns)."""
    from transformers import TrainerCallback

    from oomguard.guard import GuardEnv, guard_callbacks, guarded_train

    run_dir = Path(args.run_dir)
    bench = load_bench(args, 6, run_dir)

    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # step 3 starts
                hook = model.get_input_embeddings().register_forward_hook(
                    lambda m, i, out: (hook.remove(), out * math.nan)[1])

    env = GuardEnv(run_dir=run_dir, error_file=run_dir / "error.json")
    trainer = new_trainer(bench, [Poison(), *guard_callbacks(env)])
    guarded_train(trainer, env=env)
    raise SystemExit("bench_guard die: the NaN was not caught")


# --- the table ----------------------------------------------------------------------------------------
def per_step_ms(events: dict) -> float:
    """Host ms per optimizer step of a configuration's gated events: each median x its calls per step."""
    steps = max((v["calls"] for k, v in events.items() if k.endswith(".on_step_end")), default=0)
    return sum(v["median_ms"] * v["calls"] for v in events.values()) / steps if steps else 0.0


def print_summary(result: dict) -> None:
    cost = result.get("cost", {})
    s = cost.get("summary", {})
    print(f"\nbench_guard ({cost.get('versions', {}).get('gpu', 'cpu')}, {cost.get('arch')} {cost.get('shape')}):")
    for c in CONFIGS:
        if c in s:
            print(f"  {c:5} median cycle {s[c]['median_ms']:9.2f} ms  mean {s[c]['mean_ms']:9.2f} ms  n={s[c]['n']}")
    for key in ("old_vs_bare", "new_vs_bare", "new_vs_old"):
        if key in s:
            r = s[key]
            lo, hi = r["bootstrap_95"]
            pm = r["paired_mean"]
            plo, phi = r["paired_95"] or (math.nan, math.nan)
            print(f"  {key:12} median ratio {r['ratio']:+.2%} [{lo:+.2%}, {hi:+.2%}]   "
                  f"paired mean {pm:+.2%} [{plo:+.2%}, {phi:+.2%}] over {r['blocks']} blocks")
    for name, h in cost.get("host_summary", {}).items():
        lo, hi = h["share_95"]
        print(f"  {name:5} guard host time per step {h['mean_ms']:.2f} ms (median {h['median_ms']:.2f}) = "
              f"{h['share']:.2%} of the bare median cycle [{lo:.2%}, {hi:.2%}] over {h['n']} steps")
    j = cost.get("jitter") or {}
    if j:
        print(f"  jitter (all steps): wall q10/median/q90 {j['wall']['q10_ms']:.0f}/"
              f"{j['wall']['median_ms']:.0f}/{j['wall']['q90_ms']:.0f} ms sd {j['wall']['sd_ms']:.1f}; main-thread "
              f"CPU sd {j['cpu']['sd_ms']:.1f} ms (median {j['cpu']['median_ms']:.0f}); gc share {j['gc_share']:.2%}, "
              f"gc q90 {j['gc']['q90_ms']:.1f} ms; corr(wall, cpu) {j['corr_wall_cpu']}; lag-1 autocorr "
              f"{j['lag1_autocorr_wall']:.2f}")
    print(f"  ledger lines written (new's steps): {cost.get('ledger_lines')}")
    print("  observe_loss (in training_step, behind the backward): "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in cost.get("observe_loss_ms", {}).items()))
    print(f"  optimizer {cost.get('optim')}; GPU still busy after observe_loss: "
          f"{cost.get('gpu_busy_after_observe_loss')}; GPU ran dry in on_pre_optimizer_step: "
          f"{cost.get('gpu_idle_in_pre_optimizer_step')}")
    per_step = {name: per_step_ms(events) for name, events in cost.get("events_ms", {}).items()}
    print("  guard callbacks' host time per step (sum of medians x calls / steps): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in per_step.items()))
    print(f"  shipped NaN check on the device: {cost.get('nan_check_on_device')}")
    nan = cost.get("nan_new", {})
    print(f"  new NaN verdict ready when read: {nan.get('ready_at_check')}/{nan.get('checks')} steps")
    for name, us in cost.get("calls", {}).items():
        print(f"  call {name}: {us:.1f} µs")
    for name, events in cost.get("events_ms", {}).items():
        top = sorted(events.items(), key=lambda kv: -kv[1]["median_ms"])[:5]
        print(f"  {name} costliest events: " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in top))
    ex = result.get("exit", {}).get("summary", {})
    for mode, m in ex.items():
        print(f"  exit {mode:8}: error record -> exit median {m['median_s']:.2f} s, runs "
              + ", ".join(f"{t:.2f}" for t in m["runs_s"]))
    for r in result.get("exit", {}).get("runs", []):
        print(f"  exit run fast={r['fast']}: rc {r['exit_code']}, exit -> GPU free {r['exit_to_gpu_free_s']:.3f} s, "
              f"record kind {r['kind']} step {r['step']} last_finite_step {r['last_finite_step']}")


if __name__ == "__main__":
    main()
