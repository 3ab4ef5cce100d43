"""Unsloth under oomguard on a GPU (issue 16 item 4): a wrapped Unsloth QLoRA SFT script through a genuine OOM.

Here (a machine with PyPI), once:

    python3 scripts/gpu_unsloth.py wheels        # Unsloth's wheels into .whl/unsloth/ (+ .whl/unsloth/env.sh)

On the GPU machine (carry .whl; the base wheels from ../shared/gpu/prepare-wheels.sh are in .whl/). The device
tool returns at most 8 files from $OUT, so write elsewhere and bring back one tarball:

    mkdir -p /tmp/uout; . .whl/env.sh && . .whl/unsloth/env.sh && python3 scripts/gpu_unsloth.py all \
        --out /tmp/uout --shape 8b --seq 1024 --big 16 --steps 4 > /tmp/uout/driver.log 2>&1; \
        cp /tmp/uout/summary.json $OUT/; tar -czf $OUT/results.tgz -C /tmp/uout .

``all`` runs everything in one call and writes under ``--out``: the stack's versions and ``import unsloth``
(time, output), a random-weight Llama saved to local disk with a WordLevel tokenizer and a JSONL data set,
the peak of ``scripts/gpu_unsloth_sft.py`` (the user's script, unchanged) at the big and the half batch
(one process, no oomguard; also its logged grad norms), a VRAM cap between the two peaks, then

    python3 -m oomguard run --policy POLICY --run-dir OUT/run --vram-limit <context + cap>B -- \
        python3 scripts/gpu_unsloth_sft.py MODEL DATA OUTPUT_DIR BIG STEPS SEQ GC

and what came of it (run.json, events.jsonl, guard warnings, ``oomguard report --json``, each checkpoint's
trainer_state.json / training_args.bin) in ``summary.json``; a short table last. When the plain script
already logs a non-finite grad norm it stops before supervising (oomguard's NaN guard would stop every
attempt; docs/BENCHMARKS.md, 2026-12-01 Unsloth). ``--inject-step N`` adds an injected OOM after a
checkpoint (the resume path). ``--shape tiny --cpu`` is a CPU smoke test of the same path (Unsloth's CPU
backend, an injected OOM instead of a cap).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.monotonic()
USER_SCRIPT = ROOT / "scripts" / "gpu_unsloth_sft.py"

# What `pip install unsloth` resolves beside this project's GPU image (torch 2.11, transformers 5.17, peft 0.21,
# accelerate 1.15): unsloth 2026.10.9 pins trl <= 1.15.0 and datasets < 5.0.0, so those two replace the base
# wheels' trl 1.16 / datasets 5.2 for this run. requests: unsloth_zoo imports it at import; the image lacks it.
UNSLOTH = "unsloth==2026.10.9"
ZOO = "unsloth_zoo==2026.10.9"
EXTRAS = ["trl==1.15.0", "datasets==4.8.5", "fsspec==2026.2.0", "requests==2.34.2", "urllib3==2.8.0",
          "charset_normalizer==3.5.3"]
# Dropped from the unsloth wheel to stay under the 64 MiB carry: Unsloth Studio (a web app, 25 of its 27.3 MiB),
# which `import unsloth` never reaches. (unsloth_zoo's mlx/ must stay: unsloth_zoo/__init__ imports mlx.runtime.)
STRIP = {"unsloth": ("studio/",)}

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",  # else from_pretrained downloads a stats README from the Hub
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",  # else unsloth_compiled_cache/ in the cwd
    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}

SHAPES = {  # LlamaConfig fields; 8b = Llama-3-8B (shared/gpu/README.md)
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "small": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
SPECIALS = ("t0", "t1", "t2", "t3")  # unk, bos, eos, pad: names of the vocabulary itself

POLICY = """\
# Unsloth on the GPU (scripts/gpu_unsloth.py): cuda_oom halves the per-device batch, accumulation x2
# (effective batch kept). Knobs = what the user script sets itself (only used with --start-from-policy).
name: gpu-unsloth
description: issue 16 item 4, a wrapped Unsloth SFT script
knobs:
  max_seq_length: {seq}
  per_device_train_batch_size: {big}
  gradient_accumulation_steps: 1
  lora_r: 16
  lora_alpha: 16
  precision: bf16
ladders:
  cuda_oom:
    rungs:
      - {{op: halve_batch, floor: 1, max_times: 3, resume: safe}}
limits:
  max_attempts: 5
  no_progress_attempts: 3
  hang_timeout_s: 300
  crash_retries: 1
  backoff: {{initial_s: 0, multiplier: 1, max_s: 0}}
  gpu_release_timeout_s: 60
"""


# --- wheels (here) -----------------------------------------------------------------------------------------------
def _pip_download(dest: Path, specs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
           "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)


def _slim(wheel: Path, drop: tuple[str, ...]) -> None:
    """Rewrite ``wheel`` without the entries under ``drop`` (RECORD too, so pip installs it cleanly)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not line.startswith(drop)).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)


def cmd_wheels(a: argparse.Namespace) -> None:
    dest = ROOT / ".whl" / "unsloth"
    dest.mkdir(parents=True, exist_ok=True)
    _pip_download(dest, [UNSLOTH, ZOO, *EXTRAS])
    for w in dest.glob("*.whl"):
        name = w.name.split("-")[0]
        if name in STRIP:
            before = w.stat().st_size
            _slim(w, STRIP[name])
            print(f"{w.name}: {before / 2**20:.1f} -> {w.stat().st_size / 2**20:.1f} MiB")
    exports = " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())
    (dest / "env.sh").write_text(
        "# After .whl/env.sh: Unsloth's wheels into /tmp/site-unsloth, first on PYTHONPATH, so its trl 1.15 /\n"
        "# datasets 4.8 shadow the base wheels' 1.16 / 5.2 in /tmp/site (imports and importlib.metadata alike).\n"
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
        "/tmp/site-unsloth .whl/unsloth/*.whl && export PYTHONPATH=/tmp/site-unsloth:$PYTHONPATH " + exports + "\n")
    total = sum(p.stat().st_size for p in (ROOT / ".whl").rglob("*") if p.is_file())
    print(f".whl in all: {total / 2**20:.1f} MiB")


# --- model, tokenizer, data (GPU machine) ------------------------------------------------------------------------
def cmd_build(a: argparse.Namespace) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    shape = SHAPES[a.shape]
    out = Path(a.model)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape, rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t3", model_max_length=8192)
    fast.save_pretrained(out)
    # rows of seq words: after truncation to max_length every row is full length (the worst case)
    import random

    rng = random.Random(0)
    with open(a.data, "w") as f:
        for _ in range(a.rows):
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(4, shape['vocab_size'])}"
                                                 for _ in range(a.seq + 8))}) + "\n")
    print(json.dumps({"shape": a.shape, "params": params, "build_s": round(time.perf_counter() - t0, 1),
                      "model": str(out), "data": a.data, "rows": a.rows}))


# --- peak probe (one process, no oomguard) -----------------------------------------------------------------------
def cmd_peak(a: argparse.Namespace) -> None:
    """The user's script at each batch in this process, as written (imported, main() called); peak bytes each."""
    import gc

    import torch
    import unsloth  # noqa: F401  before transformers, as the script does
    from transformers import Trainer

    sys.path.insert(0, str(USER_SCRIPT.parent))
    import gpu_unsloth_sft as user

    cuda = torch.cuda.is_available()  # without CUDA (a smoke test of this code) every figure is 0

    def mem(name: str) -> int:
        return getattr(torch.cuda, name)() if cuda else 0

    seen: dict = {}
    train = Trainer.train  # Unsloth's wrapper of it by now; the peak of training alone, apart from the load

    def measured(self, *args, **kwargs):
        seen["load_peak_allocated"] = mem("max_memory_allocated")
        seen["model_allocated"] = mem("memory_allocated")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            seen["train_s"] = round(time.perf_counter() - t0, 1)
            seen["train_peak_allocated"] = mem("max_memory_allocated")
            seen["train_peak_reserved"] = mem("max_memory_reserved")
            seen["grad_norms"] = [h.get("grad_norm") for h in self.state.log_history if "loss" in h]
            seen["losses"] = [h.get("loss") for h in self.state.log_history if "loss" in h]
            seen["trainer_class"] = type(self).__name__
            seen["trainer_mro"] = [k.__module__ + "." + k.__qualname__ for k in type(self).__mro__][:6]

    Trainer.train = measured
    rows = []
    for batch in a.batches:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = mem("memory_allocated")
        row = {"batch": batch, "seq": a.seq, "steps": a.steps, "baseline_allocated": base}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            try:
                user.main(a.model, a.data, out, batch, a.steps, a.seq, a.gc)
                row["ok"] = True
            except torch.OutOfMemoryError as exc:
                row["ok"], row["error"] = False, str(exc).splitlines()[0]
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row.update(seen)
        seen.clear()
        row["peak_allocated"] = max(row.get("load_peak_allocated", 0), row.get("train_peak_allocated", 0),
                                    mem("max_memory_allocated"))
        # what an earlier probe left allocated in this process (a model Unsloth still references) is not this one's
        row["net_peak_allocated"] = row["peak_allocated"] - base
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    Path(a.out).write_text(json.dumps({"device": device, "probes": rows}, indent=1))


def cmd_context(a: argparse.Namespace) -> None:
    from oomguard.guard.device.vram import measure_context

    context, how = measure_context(0)
    print(json.dumps({"context": context, "context_source": how}))


# --- everything, in one GPU call ---------------------------------------------------------------------------------
class Log:
    def __init__(self, out: Path):
        self.out = out
        self.summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str))

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        # its own process group: on a timeout the supervisor's child (holding the GPU) goes too
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, **OFFLINE_ENV, **(env or {})}, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            stderr += f"\n[timeout {timeout:.0f}s: process group killed]"
        r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        wall = round(time.perf_counter() - t0, 1)
        (self.out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n[rc={r.returncode} wall={wall}s]\n"
                                              f"--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        self.summary.setdefault("calls", {})[name] = {"rc": r.returncode, "wall_s": wall}
        self.save()
        print(f"[{name}] rc={r.returncode} {wall}s", flush=True)
        return r


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line")


def _checkpoints(output_dir: Path) -> list[dict]:
    rows = []
    for ck in sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        row: dict = {"name": ck.name}
        state = ck / "trainer_state.json"
        if state.exists():
            s = json.loads(state.read_text())
            row.update(global_step=s.get("global_step"), train_batch_size=s.get("train_batch_size"),
                       losses=[h.get("loss") for h in s.get("log_history", []) if "loss" in h])
        bin_ = ck / "training_args.bin"
        if bin_.exists():
            try:
                import torch

                ta = torch.load(bin_, weights_only=False)
                row.update(args_per_device_train_batch_size=ta.per_device_train_batch_size,
                           args_gradient_accumulation_steps=ta.gradient_accumulation_steps)
            except Exception as exc:  # torch.load of TrainingArguments needs transformers importable
                row["training_args_error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def cmd_all(a: argparse.Namespace) -> None:
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    py = sys.executable
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / f"llama-{a.shape}-random", work / "data.jsonl"
    log.summary.update(shape=a.shape, seq=a.seq, big=a.big, steps=a.steps, cpu=a.cpu, gc=a.gc, offline_env=OFFLINE_ENV)

    log.run("nvidia-smi", ["bash", "-c", "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "
                           "date -u +%FT%TZ"], 30)
    v = log.run("versions", [py, "-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
                             "for p in ['torch','transformers','peft','accelerate','trl','datasets','bitsandbytes',"
                             "'unsloth','unsloth_zoo','triton','huggingface_hub','tokenizers','fsspec']"
                             " if __import__('importlib.util').util.find_spec(p.replace('-','_')) is not None}))"], 60)
    log.summary["versions"] = _last_json(v.stdout) if v.returncode == 0 else v.stderr[-2000:]
    skipped = subprocess.CompletedProcess([], 0, "skipped", "")
    imp = skipped if a.skip_import else log.run("import_unsloth", [py, "-X", "importtime", "-c",
                                     "import time; t=time.perf_counter(); import unsloth; "
                                     "print('import_unsloth_s', round(time.perf_counter()-t, 2)); "
                                     "import sys; print('modules', len(sys.modules)); "
                                     "print('optional', {m: m in sys.modules for m in ['xformers','torchvision',"
                                     "'cut_cross_entropy','torchao','flash_attn','tyro','sentencepiece','msgspec',"
                                     "'diffusers','hf_transfer','requests']})"], 240)
    slow: list = []  # -X importtime: the slowest imports by cumulative time (us), not the whole 1 MB trace
    for line in imp.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            slow.append((int(parts[1]), parts[2].rstrip()))
    if not a.skip_import:
        trace = (out / "import_unsloth.log").read_text().splitlines()
        (out / "import_unsloth.log").write_text("\n".join(x for x in trace if not x.startswith("import time:")))
    log.summary["import_unsloth_slowest_us"] = sorted(slow, reverse=True)[:40]
    log.summary["import_unsloth"] = {"rc": imp.returncode, "stdout": imp.stdout[-3000:],
                                     "stderr_tail": "\n".join(x for x in imp.stderr.splitlines()
                                                              if not x.startswith("import time:"))[-3000:]}
    log.save()
    if imp.returncode != 0:
        print("import unsloth failed: see import_unsloth.log")
        return

    b = log.run("build", [py, __file__, "build", "--shape", a.shape, "--model", str(model), "--data", str(data),
                          "--seq", str(a.seq), "--rows", str(a.rows)], 300)
    if b.returncode != 0:
        return
    log.summary["build"] = _last_json(b.stdout)

    policy = out / "policy.yaml"
    policy.write_text(POLICY.format(seq=a.seq, big=a.big))
    opts: list[str] = []
    if a.cpu:
        opts = ["--inject", "cuda_oom@step=1"]
    else:
        if a.context:  # measured before on this machine (the `context` subcommand): saves a CUDA init
            ctx = {"context": a.context, "context_source": "given (--context)"}
        else:
            ctx = _last_json(log.run("context", [py, __file__, "context"], 120).stdout)
        p = log.run("probe", [py, __file__, "peak", "--model", str(model), "--data", str(data), "--seq", str(a.seq),
                              "--steps", "2", "--out", str(out / "probe.json"), "--batches", str(a.big),
                              str(a.big // 2), "--gc", a.gc], 420)
        if p.returncode != 0:
            return
        probed = json.loads((out / "probe.json").read_text())
        # load or training, whichever is higher, over what an earlier probe in that process left allocated
        big, small = (r["net_peak_allocated"] for r in probed["probes"])
        cap = int((big * small) ** 0.5)
        limit = ctx["context"] + cap
        log.summary.update(probe=probed, context=ctx, cap=cap, limit=limit,
                           cap_between=bool(small * 1.05 < cap < big / 1.05))
        log.save()
        opts = ["--vram-limit", f"{limit}B"]
        norms = [g for r in probed["probes"] for g in r.get("grad_norms", [])]
        if any(not isinstance(g, (int, float)) or g != g or g in (float("inf"), float("-inf")) for g in norms):
            log.summary["probe_non_finite_grad_norms"] = norms
            log.save()
            print(f"the plain script (no oomguard) logged non-finite grad norms {norms}: not supervising it")
            return
    results = {"cap": _scenario(log, "run", policy, opts, model, data, work / "out", a)}
    left = a.deadline_s - (time.monotonic() - T0)
    log.summary["left_before_inject_s"] = round(left, 1)
    if a.inject_step and not a.cpu and left < 150:
        print(f"skipping the injected-resume scenario: {left:.0f} s left")
    elif a.inject_step and not a.cpu:  # the resume path under Unsloth: an injected OOM after a checkpoint, no cap
        results["inject"] = _scenario(log, "run-inject", policy, ["--inject", f"cuda_oom@step={a.inject_step}"],
                                      model, data, work / "out-inject", a)
    log.summary["result"] = results
    log.summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.save()
    print("\n=== summary")
    print(f"shape={a.shape} seq={a.seq} big batch={a.big} steps={a.steps}")
    if "probe" in log.summary:
        for r in log.summary["probe"]["probes"]:
            load, train = r.get("load_peak_allocated", 0) / 2**30, r.get("train_peak_allocated", 0) / 2**30
            print(f"probe batch {r['batch']}: peak allocated {r['peak_allocated'] / 2**30:.2f} GiB (load "
                  f"{load:.2f}, train {train:.2f}),"
                  f" reserved {r.get('train_peak_reserved', 0) / 2**30:.2f} GiB, train {r.get('train_s')} s of "
                  f"{r['wall_s']} s")
        print(f"cap {log.summary['cap'] / 2**30:.2f} GiB + context {log.summary['context']['context'] / 2**30:.2f}"
              f" = limit {log.summary['limit'] / 2**30:.2f} GiB; between: {log.summary['cap_between']}")
    for name, result in results.items():
        print(f"--- {name}: exit={result['exit']} status={result.get('status')} "
              f"attempt 1 = command: {result.get('attempt1_is_command')}")
        for at in result.get("attempts", []):
            f = at.get("failure") or {}
            print(f"attempt {at.get('n')}: orders={at.get('orders')} verified={at.get('verified')} "
                  f"failure={f.get('kind')}@{f.get('step')} {str(f.get('detail'))[:160]!r} "
                  f"resumed={at.get('resumed_from')} max_step={at.get('max_step')}")
        for rec in (result.get("report") or {}).get("recoveries", []):
            print(f"recovery after attempt {rec['attempt']}: {rec['cost']}")
        for ck in result["checkpoints"]:
            print(f"{ck}")
        print("guard warnings:", (result["guard_warnings"] or "none")[:1500])
        print("degraded:", [(e.get("part"), e.get("error")) for e in result.get("guard_events", [])
                            if e.get("event") == "guard_degraded"])


def _scenario(log: Log, name: str, policy: Path, opts: list[str], model: Path, data: Path, output_dir: Path,
              a: argparse.Namespace) -> dict:
    out, py = log.out, sys.executable
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    child = ["python3", str(USER_SCRIPT.relative_to(ROOT)), str(model), str(data), str(output_dir),
             str(a.big), str(a.steps), str(a.seq), a.gc]
    sup = [py, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), *opts, "--", *child]
    log.summary.setdefault("commands", {})[name] = sup
    timeout = max(60.0, min(a.timeout, a.deadline_s - (time.monotonic() - T0) - 25))
    s = log.run(f"{name}-supervised", sup, timeout)
    rep = log.run(f"{name}-report", [py, "-m", "oomguard", "report", str(run_dir), "--json"], 60)
    txt = log.run(f"{name}-report-text", [py, "-m", "oomguard", "report", str(run_dir)], 60)
    (out / f"{name}-report.txt").write_text(txt.stdout + txt.stderr)
    result: dict = {"exit": s.returncode}
    if (run_dir / "run.json").exists():
        run = json.loads((run_dir / "run.json").read_text())
        result.update(status=run.get("status"), config=run.get("config"), requested=run.get("requested"),
                      requested_source=run.get("requested_source"), capabilities=run.get("capabilities"),
                      vram_limit=run.get("vram_limit"), gpu=run.get("gpu"),
                      attempts=[{k: at.get(k) for k in ("n", "command", "orders", "delivered", "verified", "failure",
                                                        "resumed_from", "resumed_step", "exit_code", "max_step",
                                                        "rung", "started", "ended", "observed")}
                                for at in run.get("attempts", [])],
                      attempt1_is_command=run["attempts"][0].get("command") == run.get("command")
                      if run.get("attempts") else None)
    if rep.returncode == 0:
        try:
            result["report"] = json.loads(rep.stdout)
        except ValueError:
            pass
    events = run_dir / "events.jsonl"
    if events.exists():
        evs = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
        kinds: dict[str, int] = {}
        for e in evs:
            kinds[e.get("event")] = kinds.get(e.get("event"), 0) + 1
        result["event_counts"] = kinds
        result["guard_events"] = [e for e in evs if e.get("event") in (
            "bootstrap_trainer", "change_verified", "change_not_applied", "guard_stack", "guard_degraded",
            "recipe_unreadable", "bootstrap_resume", "vram_limit", "error_recorded", "attempt_ended", "decision",
            "checkpoint_saved", "auto_find_batch_size_off")]
        result["steps"] = [{k: e.get(k) for k in ("attempt", "step", "time", "loss")} for e in evs
                           if e.get("event") == "step"]
    warnings = run_dir / "guard-warnings.txt"
    result["guard_warnings"] = warnings.read_text() if warnings.exists() else None
    result["checkpoints"] = _checkpoints(output_dir)
    uns = [line for p in run_dir.rglob("stderr.log") for line in p.read_text(errors="replace").splitlines()
           if "Unsloth should be imported before" in line] if run_dir.exists() else []
    result["unsloth_import_order_warning"] = uns
    for ck in output_dir.glob("checkpoint-*"):
        dst = run_dir / "checkpoints" / ck.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("trainer_state.json", "adapter_config.json"):
            if (ck / f).exists():
                shutil.copy(ck / f, dst / f)
    log.summary.setdefault("result", {})[name] = result
    log.save()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("wheels")
    p = sub.add_parser("build")
    p.add_argument("--shape", choices=SHAPES, default="8b")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rows", type=int, default=256)
    p = sub.add_parser("peak")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", required=True)
    p.add_argument("--gc", default="unsloth", choices=("unsloth", "true"))
    p.add_argument("--out", required=True)
    sub.add_parser("context")
    p = sub.add_parser("all")
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/unsloth-work")
    p.add_argument("--shape", choices=SHAPES, default="8b")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--big", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--timeout", type=float, default=420)
    p.add_argument("--gc", default="unsloth", choices=("unsloth", "true"), help="use_gradient_checkpointing")
    p.add_argument("--deadline-s", type=float, default=560, help="finish within this (the GPU call's limit)")
    p.add_argument("--inject-step", type=int, default=0, help="also: an injected OOM at this step, no cap (GPU)")
    p.add_argument("--context", type=int, default=0, help="CUDA context bytes, if measured before")
    p.add_argument("--skip-import", action="store_true", help="no separate `import unsloth` timing")
    p.add_argument("--cpu", action="store_true", help="CPU smoke test: an injected OOM instead of a VRAM cap")
    a = ap.parse_args(argv)
    {"wheels": cmd_wheels, "build": cmd_build, "peak": cmd_peak, "context": cmd_context, "all": cmd_all}[a.cmd](a)


if __name__ == "__main__":
    main()
