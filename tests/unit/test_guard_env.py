from pathlib import Path

import pytest

from oomguard import protocol
from oomguard.guard.device.allocator import ALLOC_CONF, apply_allocator_defaults
from oomguard.guard.env import GuardEnv
from oomguard.protocol import Fault


def test_empty_environment_is_inactive_defaults():
    env = GuardEnv.from_env({})
    assert not env.active
    assert (env.run_dir, env.error_file, env.resume_from, env.vram_limit) == (None, None, None, None)
    assert (env.attempt, env.rank, env.world_size, env.faults, env.knobs) == (1, 0, 1, (), {})


def test_full_environment():
    env = GuardEnv.from_env({
        "OOMGUARD_RUN_DIR": "/r", "OOMGUARD_ATTEMPT": "3", "OOMGUARD_ERROR_FILE": "/r/attempts/003/error.json",
        "OOMGUARD_KNOBS": '{"per_device_train_batch_size": 2}', "OOMGUARD_RESUME_FROM": "/c/checkpoint-4",
        "OOMGUARD_VRAM_LIMIT": "24GiB", "OOMGUARD_INJECT": "cuda_oom@step=5;nan@step=9,rank=1",
        "OOMGUARD_CHECKPOINT_DIR": "/c", "RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4",
    })
    assert env.active and env.run_dir == Path("/r") and env.attempt == 3
    assert env.knobs == {"per_device_train_batch_size": 2}
    assert env.vram_limit == 24 * 2**30
    assert env.faults == (Fault("cuda_oom", step=5), Fault("nan", step=9, rank=1))
    assert (env.rank, env.world_size, env.checkpoint_dir) == (2, 4, "/c")


def test_local_rank_when_rank_missing():
    assert GuardEnv.from_env({"LOCAL_RANK": "1"}).rank == 1


@pytest.mark.parametrize("environ,needle", [
    ({"OOMGUARD_ATTEMPT": "two"}, "OOMGUARD_ATTEMPT"),
    ({"OOMGUARD_ATTEMPT": "0"}, "OOMGUARD_ATTEMPT"),
    ({"RANK": "-1"}, "RANK"),
    ({"OOMGUARD_KNOBS": "{bad"}, "OOMGUARD_KNOBS"),
    ({"OOMGUARD_KNOBS": "[1, 2]"}, "JSON object"),
    ({"OOMGUARD_VRAM_LIMIT": "lots"}, "OOMGUARD_VRAM_LIMIT"),
    ({"OOMGUARD_INJECT": "meteor@step=1"}, "OOMGUARD_INJECT"),
])
def test_bad_values_name_the_variable(environ, needle):
    with pytest.raises(ValueError, match=needle):
        GuardEnv.from_env(environ)


def test_allocator_default_respects_user_choice():
    environ = {}
    apply_allocator_defaults(environ)
    assert environ[ALLOC_CONF] == "expandable_segments:True"
    mine = {ALLOC_CONF: "max_split_size_mb:128"}
    apply_allocator_defaults(mine)
    assert mine[ALLOC_CONF] == "max_split_size_mb:128"


def test_resume_mode_from_the_environment():
    from oomguard.guard.env import resume_mode
    from oomguard.protocol import ENV_RESUME_MODE, ResumeMode

    assert resume_mode({}) is None  # an older supervisor: not told
    assert resume_mode({ENV_RESUME_MODE: ""}) == ResumeMode.NORMAL
    assert resume_mode({ENV_RESUME_MODE: "optimizer_on_cpu"}) == ResumeMode.OPTIMIZER_ON_CPU
    assert GuardEnv.from_env({ENV_RESUME_MODE: "normal"}).resume_mode == ResumeMode.NORMAL
    with pytest.raises(ValueError, match="optimizer_on_cpu"):
        resume_mode({ENV_RESUME_MODE: "cpu"})


def test_resume_mode_is_the_supervisors_decision_never_inferred_from_files(tmp_path):
    from oomguard.guard.resume.prepare import resume_mode_of
    from oomguard.protocol import ErrorRecord, FailureKind, Phase, ResumeMode

    record = ErrorRecord(kind=FailureKind.RESUME_OOM, phase=Phase.CHECKPOINT_LOAD, step=2, detail="", rank=0)
    protocol.write_error_record(protocol.attempt_dir(tmp_path, 1) / protocol.ERROR_JSON, record)
    told_normal = GuardEnv(run_dir=tmp_path, attempt=2, resume_mode=ResumeMode.NORMAL)
    assert resume_mode_of(told_normal) == ResumeMode.NORMAL  # the supervisor's decision wins
    told_cpu = GuardEnv(run_dir=tmp_path, attempt=2, resume_mode=ResumeMode.OPTIMIZER_ON_CPU)
    assert resume_mode_of(told_cpu) == ResumeMode.OPTIMIZER_ON_CPU
    # unset: normal, even beside a previous resume_oom record (decisions live in policy.decide())
    assert resume_mode_of(GuardEnv(run_dir=tmp_path, attempt=2)) == ResumeMode.NORMAL
