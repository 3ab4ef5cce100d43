"""What one of the guard's per-step calls costs in a tight loop and with its caches evicted, side by side.

Inside a training step the guard's code and data are evicted between two calls (the forward/backward, the
optimizer and the Trainer's loop run in between), so a call that takes microseconds in a loop takes ten times
that in the step (issue 17, docs/BENCHMARKS.md session 10). This bench times ``HeartbeatCallback.on_step_end``
(a ``step`` event line and, at most every 0.5 s, a heartbeat touch) and its parts: for each, ``--calls``
calls back to back (hot), then as many each after ``--evict`` matrix products of ``--size`` × ``--size``
float32 (cold):

    python scripts/bench_cold_step.py --calls 300

CPU only; prints the median µs per call for each part, hot and cold.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300, help="calls per part and mode")
    ap.add_argument("--size", type=int, default=1500, help="the evicting matrix's side (1500: 9 MB of float32)")
    ap.add_argument("--evict", type=int, default=3, help="matrix products before each cold call")
    args = ap.parse_args()

    import torch

    from oomguard import protocol
    from oomguard.guard.callbacks.heartbeat import HeartbeatCallback

    run_dir = tempfile.mkdtemp(prefix="bench-cold-")
    hb = HeartbeatCallback(run_dir, rank=0, attempt=1)
    state = types.SimpleNamespace(global_step=5, max_steps=100, epoch=0.5)
    a = torch.randn(args.size, args.size)
    parts = {
        "on_step_end": lambda: hb.on_step_end(None, state, None),
        "beat (forced)": lambda: hb.beat(now=True),
        "event_record": lambda: protocol.event_record("step", rank=0, step=5, max_steps=100, epoch=0.5, attempt=1),
        "append (kept open)": lambda: hb.events._file.append({"event": "step", "step": 5}),
    }
    times: dict[tuple[str, str], list[float]] = {(p, m): [] for p in parts for m in ("hot", "cold")}
    for name, call in parts.items():  # per part: its hot calls back to back, then its cold ones
        for mode in ("hot", "cold"):
            for _ in range(args.calls):
                if mode == "cold":
                    for _ in range(args.evict):
                        a @ a
                t = time.perf_counter()
                call()
                times[(name, mode)].append(time.perf_counter() - t)
    print(f"bench_cold_step ({args.calls} calls each, evict {args.evict} x {args.size}^2 matmul):")
    for name in parts:
        hot, cold = (statistics.median(times[(name, m)]) * 1e6 for m in ("hot", "cold"))
        print(f"  {name:20s} hot {hot:7.1f} µs   cold {cold:7.1f} µs   x{cold / hot:.1f}")


if __name__ == "__main__":
    main()
