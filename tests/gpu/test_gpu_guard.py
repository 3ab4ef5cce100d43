"""The guard's CUDA features on a real GPU: VRAM cap, memory monitor, cache clearer."""

from __future__ import annotations

import json

from conftest import run_py

CAP = """
import json, torch
from oomguard.guard import apply_vram_limit
done = apply_vram_limit(2 * 2**30)
x = torch.empty(1024 * 2**20, dtype=torch.uint8, device="cuda")   # 1 GiB: fits a 2 GiB card
try:
    y = torch.empty(int(1.6 * 2**30), dtype=torch.uint8, device="cuda")  # +1.6 GiB: does not
    raised = None
except torch.OutOfMemoryError as exc:
    raised = type(exc).__name__ + ": " + str(exc).splitlines()[0]
print(json.dumps({"vram_limit": done, "raised": raised, "reserved": torch.cuda.memory_reserved()}))
"""


def test_vram_limit_raises_a_genuine_oom(record):
    r = run_py(["-c", CAP])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    record(**got)
    assert got["raised"] and got["raised"].startswith("OutOfMemoryError")
    assert 0 < got["vram_limit"]["fraction"] < 1 and got["vram_limit"]["context"] > 0


MONITOR = """
import json, os, tempfile, torch
from transformers import TrainerCallback
from oomguard.guard import GuardEnv, guard_callbacks
from oomguard.protocol import read_jsonl
from oomguard.recipes.options import resolve_options
from oomguard.recipes.sft import build_trainer
import pynvml
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)

class Witness(TrainerCallback):
    # reads torch and NVML itself at each step end, before the guard's monitor does
    def __init__(self):
        self.rows = []
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        own = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid()]
        self.rows.append({"step": state.global_step, "torch_peak": torch.cuda.max_memory_allocated(),
                          "torch_reserved": torch.cuda.memory_reserved(), "nvml_process": own[0] if own else None,
                          "nvml_device": pynvml.nvmlDeviceGetMemoryInfo(h).used})

run_dir = tempfile.mkdtemp()
env = GuardEnv(run_dir=__import__("pathlib").Path(run_dir))
opts = resolve_options(["--output_dir", tempfile.mkdtemp(), "--max_steps", "6", "--save_steps", "100", "--no_guard",
                        "--per_device_train_batch_size", "8", "--max_seq_length", "1024", "--packing"], environ={})
trainer, _ = build_trainer(opts)
witness = Witness()
trainer.add_callback(witness)
for cb in guard_callbacks(env):
    trainer.add_callback(cb)
trainer.train()
events = [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e.get("event") == "memory"]
print(json.dumps({"events": events, "witness": witness.rows}))
"""


def test_memory_monitor_agrees_with_torch_and_nvml(record):
    r = run_py(["-c", MONITOR])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    events, witness = got["events"], {w["step"]: w for w in got["witness"]}
    record(events=events, witness=got["witness"])
    assert len(events) == 6, "one memory event per step in the first steps"
    for e in events:
        w = witness[e["step"]]
        # the monitor's step peak is torch's peak since the step began (it resets it each step)
        assert e["step_peak"] == w["torch_peak"], (e, w)
        assert e["reserved"] == w["torch_reserved"]
        # NVML sees the CUDA context too: device-wide use covers this process's reserved memory
        assert e["device_used"] >= e["reserved"]
        if w["nvml_process"]:
            assert w["nvml_process"] >= w["torch_reserved"]
            assert abs(e["device_used"] - w["nvml_device"]) < 256 * 2**20


CLEAR = """
import json, torch
from oomguard.guard.callbacks.cache import CacheClearerCallback
# fragment: many 64 MiB blocks, free every other one -> reserved stays, allocated halves
blocks = [torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda") for _ in range(40)]
del blocks[::2]
before = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
cb = CacheClearerCallback(None)
freed = cb.clear(0, "test")
after = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
print(json.dumps({"before": before, "after": after, "freed": freed}))
"""


def test_cache_clearer_returns_fragmented_memory(record):
    r = run_py(["-c", CLEAR])
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    record(**got)
    assert got["after"]["allocated"] == got["before"]["allocated"]
    assert got["after"]["reserved"] < got["before"]["reserved"] - 500 * 2**20
