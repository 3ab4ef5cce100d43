"""Issue 17 on a GPU: a spare preloads peft, trl and bitsandbytes without touching CUDA (NVML answers
bitsandbytes' device queries, ``oomguard/spare/cuda_view.py``), then as attempt 2's child trains
4-bit QLoRA exactly as a cold child does."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_py

from oomguard.protocol import ENV_ATTEMPT, ENV_RUN_DIR, read_jsonl
from oomguard.supervisor.process import StopFlag, Watch, run_child
from oomguard.supervisor.spare import Spares

HERE = Path(__file__).parent
CHILD = HERE / "_spare_qlora_child.py"
TINY = ("from transformers import LlamaConfig, LlamaForCausalLM; import sys; "
        "LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, "
        "num_attention_heads=4, num_key_value_heads=4)).save_pretrained(sys.argv[1])")


def _env(run_dir: Path, attempt: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    env.update({ENV_RUN_DIR: str(run_dir), ENV_ATTEMPT: str(attempt), "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    return env


def _gpu_pids() -> set[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    finally:
        pynvml.nvmlShutdown()


def _child(tmp: Path, model: Path, warm: bool) -> tuple[dict, dict | None, dict | None]:
    run_dir = tmp / ("warm" if warm else "cold")
    run_dir.mkdir()
    out = run_dir / "seen.json"
    argv = [sys.executable, str(CHILD), str(out), str(model)]
    keeper = Spares(run_dir, enabled=True) if warm else None
    report = None
    if keeper is not None:
        keeper.prepare(argv, _env(run_dir, 1))
        spare = keeper.current
        assert spare is not None, keeper.why_none
        assert spare.poll_ready(180), (spare.report, spare.why_dead())
        time.sleep(1.0)  # NVML lists a process a moment after its context exists
        report = dict(spare.report, on_gpu=spare.pid in _gpu_pids())
    watch = Watch(heartbeat_dir=run_dir, hang_timeout_s=None, echo=False, spares=keeper)
    try:
        outcome = run_child(argv, _env(run_dir, 2), run_dir / "attempts" / "002", watch, StopFlag())
    finally:
        if keeper is not None:
            keeper.close()
    err = (run_dir / "attempts" / "002" / "stderr.log").read_text()
    assert outcome.exit_code == 0, err[-3000:]
    started = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "child_start"] \
        if (run_dir / "events.jsonl").exists() else []
    return json.loads(out.read_text()), report, (started[0] if started else None)


def test_a_spare_holds_peft_trl_and_bitsandbytes_without_cuda_and_trains_as_a_cold_child(tmp_path, record):
    model = tmp_path / "tiny"
    made = run_py(["-c", TINY, str(model)], timeout=300)
    assert made.returncode == 0, made.stderr
    cold, _, _ = _child(tmp_path, model, warm=False)
    warm, report, started = _child(tmp_path, model, warm=True)
    record(cold=cold, warm=warm, spare=report, child_start=started)
    assert started is not None and started["start"] == "warm", started
    assert {"peft", "trl"} <= set(report["imported"]), report
    assert report["bitsandbytes"] is True and report["nvml_view"], report
    assert report["cuda"] is None and report["driver_initialised"] is False and report["on_gpu"] is False, report
    assert warm["cuda_initialized_at_start"] is False and warm["driver_initialised_at_start"] is False, warm
    assert cold["cuda_initialized_at_start"] is True  # a cold child's bitsandbytes import initialises CUDA
    assert (warm["bnb_backend"], warm["bnb_lib"]) == (cold["bnb_backend"], cold["bnb_lib"]) == \
        ("CUDA", "CudaBNBNativeLibrary")
    assert warm["losses"] == pytest.approx(cold["losses"], rel=1e-3)
    assert warm["imports_s"] < cold["imports_s"] / 5, (warm["imports_s"], cold["imports_s"])
