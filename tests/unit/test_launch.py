"""Launcher classification and the child's bootstrap env (oomguard.supervisor.launch)."""

import json
import os
import stat

import pytest

from oomguard.bootstrap import SITE_DIR
from oomguard.protocol import ENV_BOOTSTRAP, ENV_DELIVERED, EVENT_BOOTSTRAP_TRAINER
from oomguard.supervisor.launch import (
    Delivery,
    Launcher,
    bootstrap_env,
    bootstrap_outcome,
    classify_launcher,
    launch_plan,
)


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    (["python", "train.py", "--lr", "1"], Launcher.PYTHON_SCRIPT),
    (["/opt/venv/bin/python3.11", "-u", "train.py"], Launcher.PYTHON_SCRIPT),
    (["python3", "-m", "mypkg.train"], Launcher.PYTHON_MODULE),
    (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "t.py"], Launcher.TORCHRUN),
    (["python", "-m", "accelerate.commands.launch", "t.py"], Launcher.ACCELERATE),
    (["python", "-m", "trl.cli", "sft"], Launcher.TRL),
    (["accelerate", "launch", "--num_processes", "1", "t.py"], Launcher.ACCELERATE),
    (["/usr/local/bin/torchrun", "--nproc_per_node", "8", "t.py"], Launcher.TORCHRUN),
    (["trl", "sft", "--model_name_or_path", "m"], Launcher.TRL),
    (["env", "A=1", "B=2", "python", "t.py"], Launcher.PYTHON_SCRIPT),
    (["bash", "-c", "python t.py --x 1"], Launcher.SHELL_SCRIPT),
    (["bash", "-c", "echo hi"], Launcher.OTHER),
    ([], Launcher.OTHER),
])
def test_classify_by_name(argv, expected):
    assert classify_launcher(argv, path="") == expected


def test_shell_script_that_calls_a_launcher_is_python(tmp_path):
    calls = _script(tmp_path, "run.sh", "#!/bin/bash\nset -e\nexport X=1\naccelerate launch train.py \"$@\"\n")
    plain = _script(tmp_path, "plain.sh", "#!/bin/sh\necho training elsewhere\n")
    assert classify_launcher([calls, "--lr", "1"]) == Launcher.SHELL_SCRIPT
    assert classify_launcher(["bash", calls]) == Launcher.SHELL_SCRIPT
    assert classify_launcher([plain]) == Launcher.OTHER


def test_console_script_with_python_shebang_is_found_on_path(tmp_path):
    _script(tmp_path, "my-train", "#!/opt/venv/bin/python\nfrom pkg import main\nmain()\n")
    _script(tmp_path, "native-tool", "\x7fELF not really")
    assert classify_launcher(["my-train", "--x"], path=str(tmp_path)) == Launcher.PYTHON_ENTRY
    assert classify_launcher(["native-tool"], path=str(tmp_path)) == Launcher.OTHER


def test_plan_delivery_for_python_other_and_disabled():
    assert launch_plan(["python", "t.py"], {}).delivery == Delivery.BOOTSTRAP
    other = launch_plan(["true"], {"PATH": "/nonexistent"})
    assert other.delivery == Delivery.FLAGS_ENV and "not a Python command" in other.reason
    off = launch_plan(["python", "t.py"], {ENV_BOOTSTRAP: "0"})
    assert off.delivery == Delivery.DISABLED and ENV_BOOTSTRAP in off.reason
    assert off.to_dict() == {"launcher": "python_script", "delivery": "disabled", "reason": off.reason}


@pytest.mark.parametrize("flag", ["-I", "-E", "-S", "-IE", "-uS"])
def test_python_flags_that_skip_site_or_env_fall_back_and_say_why(flag):
    plan = launch_plan(["python", flag, "t.py"], {})
    assert plan.delivery == Delivery.FLAGS_ENV and "drop" in plan.reason


def test_bootstrap_env_prepends_once_and_passes_delivery():
    env = {"PYTHONPATH": os.pathsep.join(["/a", str(SITE_DIR), "/b"]), "KEEP": "1"}
    out = bootstrap_env(env, ["python", "t.py"], {"lora_r": "flag"})
    assert out["PYTHONPATH"].split(os.pathsep) == [str(SITE_DIR), "/a", "/b"]
    assert json.loads(out[ENV_DELIVERED]) == {"lora_r": "flag"} and out["KEEP"] == "1"
    assert env["PYTHONPATH"].startswith("/a")  # the caller's mapping is not modified
    assert bootstrap_env({}, ["python", "t.py"])["PYTHONPATH"] == str(SITE_DIR)


@pytest.mark.parametrize("argv, env", [(["true"], {"PATH": "/nonexistent"}), (["python", "t.py"], {ENV_BOOTSTRAP: "off"})])
def test_bootstrap_env_leaves_non_bootstrap_children_alone(argv, env):
    out = bootstrap_env({**env, "PYTHONPATH": "/a"}, argv, {"lora_r": "flag"})
    assert out["PYTHONPATH"] == "/a" and ENV_DELIVERED not in out


def test_outcome_says_in_process_or_fallback():
    events = [{"event": "attempt_started", "time": 10.0}, {"event": EVENT_BOOTSTRAP_TRAINER, "time": 12.0}]
    assert bootstrap_outcome("bootstrap", events, since=10.0) == "in_process"
    assert bootstrap_outcome("bootstrap", events, since=13.0) == "fallback"  # an earlier attempt's event
    assert bootstrap_outcome("flags_env", events, since=10.0) == "flags_env"


@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "oomguard.recipes.sft", "--max_steps", "4"], True), (["oomguard", "train"], True),
    (["/venv/bin/oomguard", "train", "--lora_r", "8"], True), (["python", "-m", "oomguard", "train"], True),
    (["trl", "sft"], False),
    (["oomguard", "run", "--", "python", "t.py"], False), (["python", "-m", "oomguard", "demo"], False),
])
def test_the_builtin_recipe_is_recognised(argv, expected):
    from oomguard.supervisor.launch import is_builtin_recipe

    assert is_builtin_recipe(argv) is expected


def test_attempt_one_orders_are_empty_unless_starting_from_the_policy():
    from oomguard.policy import load_policy_arg
    from oomguard.supervisor.spec import first_orders

    pol = load_policy_arg("demo")
    cmd = ["python", "t.py", "--per_device_train_batch_size", "16", "--bf16", "True"]
    assert first_orders(pol, cmd, {}, start_from_policy=False) == {}
    orders = first_orders(pol, cmd, {}, start_from_policy=True)
    # the flags the user wrote win; the rest are the policy's
    assert "per_device_train_batch_size" not in orders and "precision" not in orders
    assert orders["learning_rate"] == pol.start_knobs()["learning_rate"] and orders["lora_r"] == 8
