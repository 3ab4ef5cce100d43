"""Issue 17: which commands a warm spare can start exactly as a fresh process would, and what it imports."""

from __future__ import annotations

import sys

import pytest

from oomguard.spare.preload import DEFAULT, cuda_unsafe, module_source, named_imports, wanted
from oomguard.supervisor.spare import Target, import_env, warm_target


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("from transformers import Trainer, TrainingArguments\nimport torch\nimport mylib\n"
                    "def f():\n    import peft.tuners\n    from .local import x\n    import bitsandbytes\n")
    return path


def test_a_python_script_keeps_its_interpreter_options_argv_and_orig_argv(script):
    argv = ["python3", "-u", "-W", "ignore", "-X", "utf8", str(script), "--lr", "1"]
    target = warm_target(argv, {})
    assert target == Target(("python3", "-u", "-W", "ignore", "-X", "utf8"), "script", str(script),
                            (str(script), "--lr", "1"), tuple(argv))


def test_a_module_gets_the_argv_python_m_gives_before_runpy():
    assert warm_target(["python", "-m", "pkg.train", "--x", "1"], {}) == \
        Target(("python",), "module", "pkg.train", ("-m", "--x", "1"), ("python", "-m", "pkg.train", "--x", "1"))
    assert warm_target(["python", "-mpkg"], {}).name == "pkg"


@pytest.mark.parametrize("argv,why", [
    (["python", "-c", "print(1)"], "python option -c"),
    (["python", "-I", "x.py"], "python option -I"),
    (["python"], "no script"),
    (["python", "missing.py"], "is not a file"),
    (["env", "A=1", "python", "x.py"], "starts with `env`"),
    (["accelerate", "launch", "x.py"], "accelerate is not on PATH"),
    (["torchrun", "--nproc_per_node", "1", "x.py"], "torchrun starts its workers through an agent"),
    (["python", "-m", "torch.distributed.run", "x.py"], "torchrun starts its workers through an agent"),
    (["deepspeed", "x.py"], "deepspeed starts its workers through an agent"),
    (["trl", "sft", "--output_dir", "o"], "trl is not on PATH"),
    (["bash", "-c", "echo hi"], "not one Python process"),
])
def test_what_starts_cold_says_why(argv, why):
    got = warm_target(argv, {"PATH": "/nonexistent"})
    assert isinstance(got, str) and why in got, got


def test_a_console_script_runs_as_the_kernel_would_run_its_shebang(tmp_path):
    direct = tmp_path / "mytrain"
    direct.write_text(f"#!{sys.executable}\nfrom mypkg import main\nmain()\n")
    direct.chmod(0o755)
    env = {"PATH": str(tmp_path)}
    assert warm_target(["mytrain", "--a"], env) == \
        Target((sys.executable,), "script", str(direct), (str(direct), "--a"), (sys.executable, str(direct), "--a"))
    via_env = tmp_path / "viaenv"
    via_env.write_text("#!/usr/bin/env python3\nimport mypkg\n")
    via_env.chmod(0o755)
    got = warm_target([str(via_env)], env)
    assert got.interpreter == ("/usr/bin/env", "python3") and got.orig_argv == ("python3", str(via_env))
    with_option = tmp_path / "withopt"
    with_option.write_text("#!/usr/bin/env -S python3 -u\nimport mypkg\n")
    with_option.chmod(0o755)
    assert "passes options to env" in warm_target([str(with_option)], env)


def test_the_import_time_environment_leaves_out_oomguard_and_tracker_run_ids():
    env = {"OOMGUARD_ATTEMPT": "2", "OOMGUARD_KNOBS": "{}", "WANDB_RUN_ID": "abc", "MLFLOW_RUN_ID": "x",
           "TENSORBOARD_LOGGING_DIR": "d", "CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "x", "PATH": "/bin"}
    assert import_env(env) == {"CUDA_VISIBLE_DEVICES": "0", "PYTORCH_CUDA_ALLOC_CONF": "x", "PATH": "/bin"}


def test_the_spare_imports_the_heavy_stack_the_script_names_never_bitsandbytes(script):
    assert named_imports(script.read_text()) == [("transformers", ("Trainer", "TrainingArguments")), ("torch", ()),
                                                 ("peft.tuners", ())]
    assert wanted("script", str(script)) == named_imports(script.read_text())
    assert wanted("script", str(script), drop=["peft"]) == [("transformers", ("Trainer", "TrainingArguments")),
                                                            ("torch", ())]


def test_a_script_that_names_no_heavy_package_gets_the_default_stack(tmp_path):
    path = tmp_path / "cli.py"
    path.write_text("from mypkg.cli import main\nmain()\n")
    assert [m for m, _ in wanted("script", str(path))] == list(DEFAULT)
    assert "bitsandbytes" not in DEFAULT


def test_a_modules_source_is_found_without_running_its_package(tmp_path, monkeypatch):
    pkg = tmp_path / "runme"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not run')\n")
    (pkg / "train.py").write_text("import datasets\n")
    (pkg / "__main__.py").write_text("import trl\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_source("runme.train") == str(pkg / "train.py")
    assert module_source("runme") == str(pkg / "__main__.py")
    assert wanted("module", "runme.train") == [("datasets", ())]
    assert module_source("no_such_module_here") is None


def test_a_script_of_the_standard_library_alone_gets_no_spare(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text("import json, os\nfrom pathlib import Path\n")
    assert wanted("script", str(path)) == []
    assert "standard library only" in warm_target(["python", str(path)], {})



def test_on_a_cuda_torch_with_bitsandbytes_peft_and_trl_are_left_to_the_child():
    plan = [("torch", ()), ("transformers", ("Trainer",)), ("peft", ("LoraConfig",)), ("trl.trainer", ())]
    assert cuda_unsafe(plan, cuda_build=True, bnb_installed=True) == {"peft", "trl.trainer"}
    assert cuda_unsafe(plan, cuda_build=False, bnb_installed=True) == set()  # CPU torch: bnb finds no device
    assert cuda_unsafe(plan, cuda_build=True, bnb_installed=False) == set()


def test_the_preload_imports_each_module_once_torch_first(tmp_path):
    import subprocess

    code = ("from oomguard.spare.preload import preload; import json; "
            "print(json.dumps(preload([('json', ('dumps',)), ('torch', ()), ('json', ('loads',)), ('torch', ())])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    report = __import__("json").loads(out.stdout.splitlines()[-1])
    assert report["imported"] == ["torch", "json"] and report["cuda"] is None


def test_accelerate_and_trl_launchers_run_warm_with_their_workers_imports_planned(tmp_path, script):
    """The launcher is a console script run warm; its worker forks from it (spare/fork_worker.py), so the
    spare also preloads what the worker imports: accelerate's training script, or the default stack for trl."""
    for name, module in (("accelerate", "accelerate.commands.accelerate_cli"), ("trl", "trl.cli.main")):
        exe = tmp_path / name
        exe.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
        exe.chmod(0o755)
    env = {"PATH": str(tmp_path)}
    acc = warm_target(["accelerate", "launch", "--num_processes", "1", str(script), "--lr", "1"], env)
    assert isinstance(acc, Target) and acc.launcher == "accelerate" and acc.kind == "script"
    assert acc.also == (("script", str(script)),) and acc.name == str(tmp_path / "accelerate")
    trl = warm_target(["trl", "sft", "--output_dir", "o"], env)
    assert isinstance(trl, Target) and trl.launcher == "trl" and trl.also == (("default", ""),)
    via_python = warm_target([sys.executable, "-m", "accelerate.commands.launch", str(script)], env)
    assert isinstance(via_python, Target) and via_python.kind == "module" and via_python.launcher == "accelerate"
    assert warm_target([sys.executable, str(script)], env).launcher is None
