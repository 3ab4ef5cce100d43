"""Culprit-batch benchmark (issue 19): Llama-3-8B-shaped QLoRA under an emulated 24 GiB card, one data set with
rare long rows that run out of memory at the requested batch, three ways side by side in one run:

  culprit   ``oomguard run`` (split_culprits on): the OOM's step is trained as smaller micro-batches, same knobs;
  ladder    ``oomguard run`` with ``limits.split_culprits: false``: today's cuda_oom ladder (length, then batch);
  auto      HF ``auto_find_batch_size=True``.

Each way runs the same unchanged user script (scripts/bench_train.py, ``--trainer hf``: transformers.Trainer with
dynamic padding, full logits) on the same rows in the same order. Reported per way: whole-run tokens/s (the
non-padding tokens of the steps the run kept, over its wall clock, restarts and model loads included), the
share of the data's tokens each way did not train (cut by a shorter max_seq_length), attempts/restarts, the final
recipe. ``--tiny`` is a CPU dry run of the plumbing (no cap on CPU: ``cuda_oom@tokens=N`` stands in).

    python scripts/bench_culprit.py --model /tmp/llama3-8b-random --out results.json [--ways culprit,ladder,auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_common  # noqa: E402
import bench_recovery  # noqa: E402

SCENARIO = bench_recovery.Scenario("culprit", "24 GiB card, batch 8, rows ~300 tokens, 2 rows of 2048",
                                   "24GiB", "culprit-on", 2048, 8, trainer="hf", max_steps=16, save_steps=4,
                                   timeout_s=180)
LONG_AT = (0.3, 0.7)  # the long rows (2048 tokens) train in the steps 30 % and 70 % into the run
SEED = 42  # bench_train's --seed default: accelerate's seedable sampler draws torch.randperm(n) from it


def sampler_order(n: int, seed: int = SEED) -> list[int]:
    """The epoch-0 order the Trainer's sampler hands out (checked against the ledger's orders file after)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def long_rows(s: bench_recovery.Scenario) -> list[int]:
    """Dataset rows that the sampler puts first into the steps ``LONG_AT`` of the run (never step 1:
    a culprit needs steps that fit before it)."""
    order = sampler_order(s.max_steps * s.effective)
    return [order[max(1, int(f * s.max_steps)) * s.effective] for f in LONG_AT]


def lengths(s: bench_recovery.Scenario, seed: int = 0) -> list[int]:
    """Log-normal around 300 tokens (at most 512), the long rows 2047 (+ EOS = 2048)."""
    n = s.max_steps * s.effective
    out = [min(x, 512) for x in bench_common.sample_lengths(n, 560, seed, median_factor=0.55, sigma=0.35)]
    for row in long_rows(s):
        out[row] = 2047
    return out


def placed(work: Path, s: bench_recovery.Scenario) -> bool | None:
    """Whether the sampler really handed the long rows out where :func:`long_rows` planned (the ledger's order)."""
    from oomguard.protocol import read_jsonl

    lines = list(read_jsonl(work / "culprit" / "run" / "ledger" / "rank0.orders.jsonl"))
    if not lines:
        return None
    order = [first + k for first, length in lines[0]["order"] for k in range(length)]
    return order == sampler_order(len(order))


def policies(out: Path, s: bench_recovery.Scenario) -> Path:
    """culprit-on.yaml / culprit-off.yaml: the rtx-24gb policy, knobs as the script runs (attempt 1 as written)."""
    base = yaml.safe_load((bench_recovery.POLICIES / "rtx-24gb.yaml").read_text())
    base.pop("match", None)
    base["knobs"].update(max_seq_length=s.seq, per_device_train_batch_size=s.batch,
                         gradient_accumulation_steps=s.accum, learning_rate=s.learning_rate)
    base["limits"]["max_attempts"] = 8
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("culprit-on", True), ("culprit-off", False)):
        doc = {**base, "name": name, "limits": {**base["limits"], "split_culprits": split}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def kept_tokens(work: Path) -> tuple[int, int]:
    """(non-padding tokens of the steps the run kept: each step's newest record, steps kept)."""
    newest: dict[int, int] = {}
    for e in bench_recovery.read_events(work / "events.jsonl"):
        if e["event"] == "step":
            newest[e["step"]] = e["tokens"]
    return sum(newest.values()), len(newest)


def one(way: str, s: bench_recovery.Scenario, model: str, data: Path, work: Path, inject: str | None) -> dict:
    scenario = dataclasses.replace(s, policy="culprit-off") if way == "ladder" else s
    result = bench_recovery.run_way("auto" if way == "auto" else "oomguard", scenario, model, data, work / way,
                                    inject)
    tokens, steps = kept_tokens(work / way)
    result.update(way=way, kept_tokens=tokens, kept_steps=steps,
                  whole_run_tokens_per_s=round(tokens / result["wall_s"], 1) if result["wall_s"] else None)
    run_json = work / way / "run" / "run.json"
    if run_json.exists():
        run = json.loads(run_json.read_text())
        result["decisions"] = [a["decision"]["reason"] for a in run["attempts"] if a.get("decision")]
        result["verified"] = [a.get("verified") for a in run["attempts"]]
    result.pop("events", None)
    return result


def table(results: list[dict], data_tokens: int, steps: int, effective: int) -> str:
    rows = ["| way | finished | wall s | attempts / restarts | steps kept | tokens trained | tokens cut | "
            "whole-run tokens/s | final batch x accum x length |", "|---|---|---|---|---|---|---|---|---|"]
    full = max((r["kept_tokens"] for r in results if r["finished"]), default=0)
    for r in results:
        f = r["final"]
        again = r.get("attempts", (r.get("restarts") or 0) + 1)
        same_rows = r["kept_steps"] == steps and f["effective_batch"] == effective
        cut = 1 - r["kept_tokens"] / full if full and same_rows else None
        cut_text = f"{cut:.2%}" if cut is not None else f"n/a (effective batch {effective} → {f['effective_batch']})"
        rows.append(f"| {r['way']} | {r['finished']} | {r['wall_s']} | {again} | {r['kept_steps']}/{steps} | "
                    f"{r['kept_tokens']} | {cut_text} | {r['whole_run_tokens_per_s']} | "
                    f"{f['per_device_train_batch_size']} x {f['gradient_accumulation_steps']} x "
                    f"{f['max_seq_length']} |")
    rows.append(f"\n(data: {data_tokens} tokens in the rows the {steps} steps draw from; tokens cut = 1 - tokens "
                "trained / the most any finished way trained over the same steps and rows)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/bench-culprit")
    ap.add_argument("--ways", default="culprit,ladder,auto")
    ap.add_argument("--steps", type=int, default=SCENARIO.max_steps, help="optimizer steps of each way")
    ap.add_argument("--timeout_s", type=int, default=SCENARIO.timeout_s, help="wall-clock limit of each way")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run (short rows, an injected token-count OOM)")
    a = ap.parse_args(argv)
    s, inject = dataclasses.replace(SCENARIO, max_steps=a.steps, timeout_s=a.timeout_s), None
    if a.tiny:
        s = dataclasses.replace(bench_recovery.tiny(s), seq=2048, max_steps=6, save_steps=2)
        inject = "cuda_oom@tokens=8000"  # 8 x 2048 OOMs, 8 x 512 and 2 x 2048 fit
    work = Path(a.work)
    bench_recovery.POLICIES = policies(work / "policies", s)
    rows = lengths(s)
    data = bench_common.write_dataset(work / "rows.jsonl", rows, seed=0)
    started = time.time()
    results = [one(way, s, a.model, data, work, inject) for way in a.ways.split(",")]
    doc = {"scenario": dataclasses.asdict(s), "versions": bench_common.versions(), "rows": len(rows),
           "long_rows": long_rows(s), "order_as_planned": placed(work, s), "data_tokens": sum(x + 1 for x in rows),
           "inject": inject,
           "wall_s": round(time.time() - started, 1), "results": results}
    doc["table"] = table(results, doc["data_tokens"], s.max_steps, s.effective)
    Path(a.out).write_text(json.dumps(doc, indent=1, default=str))
    print(doc["table"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
