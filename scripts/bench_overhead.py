"""The guard's per-step overhead: step time with and without its callbacks, in the same process.

    python scripts/bench_overhead.py --model8b /tmp/llama3-8b-random --tiny /tmp/bench-tiny \\
        --out overhead.json --steps 12 --rounds 2
    python scripts/bench_overhead.py --tiny /tmp/bench-tiny --only tiny --out overhead.json \\
        --tiny-steps 4 --tiny-rounds 1 --tiny-shape 2x64    # CPU dry run

Each model runs in its own child process (this script with ``--worker``; the two never share
CUDA state), tiny first. The child loads the model once with the recipe's pieces
(``pick_device``, ``load_tokenizer``, ``load_base_model``, ``attach_lora``) and builds one TRL
``SFTTrainer`` per arm on that same model with the recipe's ``sft_config`` (no checkpoint is
ever written: ``save_strategy`` "no"; no VRAM cap):

- arm A: no guard, ``trainer.train()``;
- arm B: ``guard_callbacks(GuardEnv(run_dir=tmp))`` and ``guarded_train`` — the full guard as the
  recipe runs it under the supervisor (journal, heartbeat, memory monitor, cache clearer, NaN
  guard and its loss wrapper, data profile, shutdown with a supervisor pid to watch, sample ledger).

Arms alternate A B, B A, A B … (``--rounds`` pairs, ABBA order cancels a linear drift). A timing
callback, first of the user callbacks in both arms, synchronizes CUDA and reads ``perf_counter``
at ``on_step_begin`` and ``on_step_end``: ``cycle`` = begin(k+1) − begin(k) holds everything per
step (the guard's ``on_step_end`` work, logging, the next batch), ``inner`` = end(k) − begin(k).
The first 2 steps of each arm are dropped. Overhead = median_B / median_A − 1 of the pooled
cycle times, with per-round overheads and a bootstrap 95 % interval. In arm B each guard
callback event is also timed (host time; an event that synchronizes, as the NaN guard's finite
check does, also waits there for queued GPU work, so its share reads high).

Data: a JSONL from bench_common whose rows are nearly all longer than the max length, so
every batch is batch × max_length tokens and step times do not vary with the data.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402

from oomguard.protocol import atomic_write_json  # noqa: E402

WARMUP = 2  # steps dropped at the start of each arm
SHAPES = {"tiny": (8, 256), "8b": (2, 1024)}  # per-device batch, max length
ARCH_FLAG = {"tiny": "tiny", "8b": "model8b"}
LENGTH_MEDIAN, LENGTH_SIGMA = 1.25, 0.1  # rows ~1.25 x max length: ~1 % shorter than it
BOOTSTRAP = 2000


# --- the parent: one child per model, then the table ---------------------------------------------
def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    models = [key for key in ("tiny", "8b") if args.only in (None, key)]
    missing = [f"--{ARCH_FLAG[key]}" for key in models if getattr(args, ARCH_FLAG[key]) is None]
    if missing:
        sys.exit(f"bench_overhead: {' and '.join(missing)} needed (or pick one model with --only)")
    command = shlex.join(["python", "scripts/bench_overhead.py", *sys.argv[1:]])
    atomic_write_json(args.out, {"versions": None, "models": {}, "command": command})
    for key in models:
        print(f"bench_overhead: {key}: starting its own process", flush=True)
        rc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", key]).returncode
        if rc != 0:
            update_model(args.out, key, {"exit_code": rc})
            print(f"bench_overhead: {key}: worker exited {rc}", flush=True)
    print_table(json.loads(Path(args.out).read_text()))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model8b", help="the Llama-3-8B-shaped model folder (built there by bench_common if absent)")
    ap.add_argument("--tiny", help="the tiny model folder (built there by bench_common if absent)")
    ap.add_argument("--out", required=True, help="JSON result, rewritten after every arm")
    ap.add_argument("--only", choices=sorted(SHAPES), help="run one model only")
    ap.add_argument("--steps", type=int, default=12, help="measured steps per arm, 8B (after the warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B pairs, 8B")
    ap.add_argument("--tiny-steps", type=int, default=60, help="measured steps per arm, tiny model")
    ap.add_argument("--tiny-rounds", type=int, default=2, help="A/B pairs, tiny model")
    ap.add_argument("--tiny-shape", default="x".join(map(str, SHAPES["tiny"])),
                    help="BATCHxMAX_LENGTH of the tiny model (smaller for a CPU dry run)")
    ap.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (both models)")
    ap.add_argument("--worker", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    return ap.parse_args()


def print_table(result: dict) -> None:
    print(f"\n{'model':6} {'shape':>9} {'median A':>10} {'median B':>10} {'overhead':>9} "
          f"{'per round':>22} {'bootstrap 95 %':>18}")
    for key, m in result["models"].items():
        s = m.get("summary", {}).get("cycle")
        if s is None:
            print(f"{key:6} (no summary: exit code {m.get('exit_code')}, {len(m.get('arms', []))} arms done)")
            continue
        rounds = ", ".join(f"{x:+.2%}" for x in s["per_round_overhead"])
        lo, hi = s["bootstrap_95"]
        print(f"{key:6} {m['batch']:>3}x{m['max_length']:<5} {s['A']['median_s'] * 1e3:>8.2f}ms "
              f"{s['B']['median_s'] * 1e3:>8.2f}ms {s['overhead']:>+9.2%} {rounds:>22} "
              f"{f'[{lo:+.2%}, {hi:+.2%}]':>18}")
        top = sorted(m.get("callback_costs", {}).items(), key=lambda kv: -kv[1]["per_step_ms"])[:4]
        if top:
            print(f"       guard events {m['callback_per_step_ms']:.3f} ms per step; costliest: "
                  + ", ".join(f"{name} {c['per_step_ms']:.3f}" for name, c in top))


# --- JSON, written incrementally ------------------------------------------------------------------
def update_model(path: str, key: str, fields: dict, versions: dict | None = None) -> None:
    result = json.loads(Path(path).read_text())
    result["models"].setdefault(key, {}).update(fields)
    if versions is not None:
        result["versions"] = versions
    atomic_write_json(path, result)


# --- the child: one model, all arms --------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["OOMGUARD_SUPERVISOR_PID"] = str(os.getppid())  # the shutdown callback watches it, as under oomguard
    from oomguard.guard import apply_allocator_defaults

    apply_allocator_defaults()  # before torch touches CUDA, as the recipe does under the guard
    import warnings

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    warnings.filterwarnings("ignore", message=".*needs CUDA and none is available.*")

    key = args.worker
    steps, rounds = (args.steps, args.rounds) if key == "8b" else (args.tiny_steps, args.tiny_rounds)
    model_dir = str(bench_common.build_model(getattr(args, ARCH_FLAG[key]), key))
    batch, max_length = SHAPES[key] if key == "8b" else map(int, args.tiny_shape.split("x"))
    with tempfile.TemporaryDirectory(prefix=f"bench-overhead-{key}-") as tmp:
        bench = Bench(key, model_dir, batch, max_length, args.grad_accum, WARMUP + steps + 1, Path(tmp))
        update_model(args.out, key, bench.describe(steps, rounds), versions=bench_common.versions())
        arms = []
        for r in range(rounds):
            for arm in ("AB" if r % 2 == 0 else "BA"):
                arms.append(bench.run_arm(arm, r))
                update_model(args.out, key, {"arms": arms})
        costs = callback_costs(arms)
        update_model(args.out, key, {"summary": summarize(arms), "callback_costs": costs,
                                     "callback_per_step_ms": sum(c["per_step_ms"] for c in costs.values())})
    print(f"bench_overhead {key}: done", flush=True)


class Bench:
    """The model loaded once; one SFTTrainer per arm on it."""

    def __init__(self, key: str, model_dir: str, batch: int, max_length: int, grad_accum: int, max_steps: int,
                 tmp: Path):
        from transformers import set_seed

        from oomguard.recipes import model as qlora
        from oomguard.recipes.dataset import load_sft_dataset
        from oomguard.recipes.options import resolve_options

        self.key, self.tmp = key, tmp
        self.batch, self.max_length, self.grad_accum, self.max_steps = batch, max_length, grad_accum, max_steps
        self.options = resolve_options([
            "--model", model_dir, "--output_dir", str(tmp / "out"), "--max_steps", str(max_steps),
            "--save_steps", "1000000", "--per_device_train_batch_size", str(batch),
            "--max_seq_length", str(max_length), "--gradient_accumulation_steps", str(grad_accum),
        ], environ={})
        rows = batch * grad_accum * max_steps
        self.lengths = bench_common.sample_lengths(rows, max_length, 0, median_factor=LENGTH_MEDIAN,
                                                   sigma=LENGTH_SIGMA)
        self.dataset = load_sft_dataset(bench_common.write_dataset(tmp / "data.jsonl", self.lengths, 0))
        started = time.perf_counter()
        self.device = qlora.pick_device(self.options)
        set_seed(self.options.seed)
        self.tokenizer = qlora.load_tokenizer(model_dir)
        self.model = qlora.attach_lora(
            qlora.load_base_model(model_dir, self.options, self.device, self.tokenizer), self.options)
        self.load_s = time.perf_counter() - started
        print(f"bench_overhead {key}: loaded {model_dir} on {self.device.name} in {self.load_s:.1f}s "
              f"({qlora.count_4bit_layers(self.model)} Linear4bit)", flush=True)

    def describe(self, steps: int, rounds: int) -> dict:
        return {"model": self.options.model, "arch": self.key, "device": self.device.name,
                "precision": self.device.precision, "optim": self.device.optim, "batch": self.batch,
                "max_length": self.max_length, "grad_accum": self.grad_accum, "steps_per_arm": steps,
                "warmup_steps": WARMUP, "max_steps": self.max_steps, "rounds": rounds, "load_s": self.load_s,
                "data": {"rows": len(self.lengths), "median_factor": LENGTH_MEDIAN, "sigma": LENGTH_SIGMA,
                         "rows_at_max_length": sum(n + 1 >= self.max_length for n in self.lengths) / len(self.lengths)},
                "arms": []}

    def run_arm(self, arm: str, round_: int) -> dict:
        from transformers import set_seed
        from trl import SFTTrainer

        from oomguard.guard import GuardEnv, guard_callbacks, guarded_train
        from oomguard.recipes.model import trainable_to_fp32

        timer = make_step_timer()
        env = GuardEnv(run_dir=self.tmp / f"run-{round_}{arm}") if arm == "B" else None
        if env is not None:
            env.run_dir.mkdir()  # the supervisor makes it
        set_seed(self.options.seed)
        trainer = SFTTrainer(model=self.model, args=self.config(), train_dataset=self.dataset,
                             processing_class=self.tokenizer,
                             callbacks=[timer, *(guard_callbacks(env) if env is not None else [])])
        trainable_to_fp32(trainer.model)
        trainer._oomguard_raw_dataset = self.dataset  # as the recipe: the guard maps examples on resume
        costs: dict[str, list[float]] = {}
        started = time.perf_counter()
        if env is None:
            trainer.train()
        else:
            guarded_train(trainer, env=env, train_fn=functools.partial(instrumented_train, trainer, costs))
        train_s = time.perf_counter() - started
        result = {"arm": arm, "round": round_, **timer.result(started), "train_s": train_s,
                  "steps_done": trainer.state.global_step}
        if costs:
            result["callback_s"] = {name: times for name, times in costs.items() if times}
        del trainer
        result["allocated_after_gib"] = release_memory()
        c = statistics.median(result["cycle_s"]) if result["cycle_s"] else float("nan")
        print(f"bench_overhead {self.key}: round {round_} arm {arm}: median cycle {c * 1e3:.2f} ms over "
              f"{len(result['cycle_s'])} steps, train() {train_s:.1f}s", flush=True)
        return result

    def config(self):
        from transformers.trainer_utils import SaveStrategy

        from oomguard.recipes.sft import sft_config

        config = sft_config(self.options, self.device)
        config.save_strategy = SaveStrategy.NO  # "steps" would save at the last step
        return config


def release_memory() -> float | None:
    """Free the finished trainer's optimizer and cache; allocated GiB left (None on CPU)."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def make_step_timer():
    """A callback that reads perf_counter after a CUDA sync at every step begin and end."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append(now())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(now())

        def result(self, train_called: float) -> dict:
            """Warm-up steps dropped; ``startup_s`` is train() called -> first step begin."""
            cycle = [b - a for a, b in zip(self.begins, self.begins[1:])][WARMUP:]
            inner = [e - b for b, e in zip(self.begins, self.ends)][WARMUP:WARMUP + len(cycle)]
            return {"cycle_s": cycle, "inner_s": inner,
                    "startup_s": self.begins[0] - train_called if self.begins else None}

    return StepTimer()


def instrumented_train(trainer, costs: dict[str, list[float]], resume_from_checkpoint=None):
    """``trainer.train`` with the guard's events timed (called by guarded_train: the ledger is in)."""
    instrument(trainer.callback_handler.callbacks, costs)
    return trainer.train(resume_from_checkpoint=resume_from_checkpoint)


def instrument(callbacks, costs: dict[str, list[float]]) -> None:
    """Time every event each oomguard callback overrides; seconds per call go to ``costs``."""
    from transformers import TrainerCallback

    events = [name for name in vars(TrainerCallback) if name.startswith("on_")]
    for cb in callbacks:
        if not type(cb).__module__.startswith("oomguard."):
            continue
        for event in events:
            if getattr(type(cb), event) is not getattr(TrainerCallback, event):
                setattr(cb, event, _timed(getattr(cb, event), costs.setdefault(f"{type(cb).__name__}.{event}", [])))


def _timed(method, sink: list[float]):
    def call(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - started)
    return call


# --- statistics ------------------------------------------------------------------------------------
PER_STEP_EVENTS = ("on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_substep_end")


def summarize(arms: list[dict]) -> dict:
    return {metric: compare(arms, f"{metric}_s") for metric in ("cycle", "inner")}


def compare(arms: list[dict], field: str) -> dict:
    """Median/mean per arm, overhead of the pooled medians, per round, and a bootstrap interval."""
    pooled = {arm: [t for a in arms if a["arm"] == arm for t in a[field]] for arm in "AB"}
    if not pooled["A"] or not pooled["B"]:
        return {}
    per_round = []
    for r in sorted({a["round"] for a in arms}):
        times = {a["arm"]: a[field] for a in arms if a["round"] == r}
        if times.get("A") and times.get("B"):
            per_round.append(ratio(times["A"], times["B"]))
    rng = random.Random(0)
    boot = sorted(ratio(rng.choices(pooled["A"], k=len(pooled["A"])), rng.choices(pooled["B"], k=len(pooled["B"])))
                  for _ in range(BOOTSTRAP))
    return {
        **{arm: {"median_s": statistics.median(ts), "mean_s": statistics.fmean(ts),
                 "stdev_s": statistics.stdev(ts) if len(ts) > 1 else 0.0, "n": len(ts)}
           for arm, ts in pooled.items()},
        "overhead": ratio(pooled["A"], pooled["B"]),
        "overhead_mean": statistics.fmean(pooled["B"]) / statistics.fmean(pooled["A"]) - 1,
        "per_round_overhead": per_round,
        "bootstrap_95": [boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]],
    }


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(b) / statistics.median(a) - 1


def callback_costs(arms: list[dict]) -> dict:
    """Per guard event over all B arms: calls, total and median ms; ``per_step_ms`` counts only
    events fired every step (median x calls per step), one-off events (train begin/end) as 0."""
    merged: dict[str, list[float]] = {}
    steps = 0
    for a in arms:
        for name, times in a.get("callback_s", {}).items():
            merged.setdefault(name, []).extend(times)
        steps += a["steps_done"] if "callback_s" in a else 0
    out = {}
    for name, times in merged.items():
        per_step = name.rpartition(".")[2] in PER_STEP_EVENTS
        median_ms = statistics.median(times) * 1e3
        out[name] = {"calls": len(times), "total_ms": sum(times) * 1e3, "median_ms": median_ms,
                     "per_step_ms": median_ms * len(times) / steps if per_step and steps else 0.0}
    return out


if __name__ == "__main__":
    main()
