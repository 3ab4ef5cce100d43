"""RewarmCallback on a real optimizer and scheduler: the first N steps at (k+1)/N of the schedule's rate,
the scheduler's own values untouched (LambdaLR as HF builds it, and a chainable one)."""

import json
import types

import pytest
import torch

from oomguard.guard.callbacks.rewarm import RewarmCallback, rewarm_factor


def _train(tmp_path, scheduler_of, steps=3, n=6, start=10):
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = scheduler_of(opt)
    cb = RewarmCallback(tmp_path, attempt=2, steps=steps)
    state = types.SimpleNamespace(global_step=start)
    cb.on_train_begin(None, state, None)
    used, scheduled = [], []
    for _ in range(n):
        scheduled.append(opt.param_groups[0]["lr"])
        cb.on_step_begin(None, state, None, optimizer=opt)
        used.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        cb.on_optimizer_step(None, state, None, optimizer=opt)
        sched.step()
        state.global_step += 1
    return used, scheduled


@pytest.mark.parametrize("scheduler_of", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100),  # HF's linear decay
    lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),  # chainable: reads the group's lr
])
def test_the_first_steps_ramp_and_the_schedule_is_untouched(tmp_path, scheduler_of):
    used, scheduled = _train(tmp_path, scheduler_of)
    _, plain = _train(tmp_path / "plain", scheduler_of, steps=0)
    assert scheduled == pytest.approx(plain)  # the scheduler saw its own values
    factors = [u / s for u, s in zip(used, scheduled)]
    assert factors == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0])
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["event"], event["attempt"], event["step"], event["steps"]) == ("rewarm", 2, 11, 3)
    assert event["lr"] == pytest.approx([event["scheduled"][0] / 3])


def test_the_factor():
    assert [rewarm_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert rewarm_factor(0, 0) == 1.0
