"""The demo command line is a valid recipe command with the faults the guard can parse."""

import sys

from oomguard import protocol
from oomguard.recipes.demo_plan import DEMO_INJECT, demo_command, demo_vram_limit_on_cuda
from oomguard.recipes.options import resolve_options


def test_demo_command_parses_as_recipe_flags():
    cmd = demo_command(output_dir="/tmp/x", max_steps=12, save_steps=3)
    assert cmd[:3] == [sys.executable, "-m", "oomguard.recipes.sft"]
    o = resolve_options(cmd[3:], environ={})
    assert (o.output_dir, o.max_steps, o.save_steps, o.model, o.dataset) == ("/tmp/x", 12, 3, None, None)


def test_demo_faults_parse_and_fall_between_checkpoints():
    faults = protocol.parse_inject(DEMO_INJECT)
    assert [f.kind for f in faults] == ["cuda_oom", "nan"]
    save_steps = 4  # demo_command's default
    assert all(f.step % save_steps and f.step < 24 for f in faults)


def test_no_emulated_card_for_the_tiny_model():
    assert demo_vram_limit_on_cuda() is None


def test_the_plan_per_machine():
    from oomguard.recipes.demo_plan import CUDA_CAP, CUDA_EXTRA, CUDA_INJECT, demo_plan

    cpu = demo_plan(gpu_name=None, output_dir="/tmp/x", python="py")
    assert (cpu.vram_limit, cpu.inject, cpu.command) == (None, DEMO_INJECT, demo_command("py", output_dir="/tmp/x"))
    gpu = demo_plan(gpu_name="NVIDIA H200", output_dir="/tmp/x", python="py")
    assert (gpu.vram_limit, gpu.inject) == (CUDA_CAP, CUDA_INJECT) and gpu.command[-len(CUDA_EXTRA):] == CUDA_EXTRA
    assert "NVIDIA H200" in gpu.where
