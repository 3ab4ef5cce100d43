"""StopAgreement: the ranks of a group stop at one step end, whichever rank was signalled and when."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from oomguard.guard.callbacks.shutdown import ShutdownCallback, StopAgreement


class DictStore:
    """The three c10d store calls the agreement uses, with TCPStore's semantics."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.calls = 0

    def compare_set(self, key, expected, desired):
        self.calls += 1
        if key not in self.data and expected == "":
            self.data[key] = desired.encode()
        elif key in self.data and self.data[key] == expected.encode():
            self.data[key] = desired.encode()
        return self.data.get(key, expected.encode())

    def check(self, keys):
        self.calls += 1
        return all(k in self.data for k in keys)

    def get(self, key):
        self.calls += 1
        return self.data[key]


def step(cb: ShutdownCallback, n: int):
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(None, SimpleNamespace(global_step=n), control)
    return control.should_save and control.should_training_stop


def test_the_signalled_rank_and_its_peer_stop_at_the_same_next_step_end(tmp_path):
    store = DictStore()
    r0 = ShutdownCallback(tmp_path, rank=0, supervisor_pid=None, agreement=StopAgreement(store))
    r1 = ShutdownCallback(tmp_path, rank=1, supervisor_pid=None, agreement=StopAgreement(store))
    assert not step(r0, 4) and not step(r1, 4)
    r1.request(signal.SIGUSR1, "received SIGUSR1")  # only rank 1 got the scheduler's warning, in step 5
    assert not step(r0, 5)  # rank 0 ended step 5 before rank 1 proposed
    assert not step(r1, 5)  # rank 1 proposes the end of step 6: rank 0 may already be past step 5's end
    assert step(r0, 6) and step(r1, 6)
    assert r0.signum == r1.signum == signal.SIGUSR1  # both exit 128 + SIGUSR1
    assert "agreed to stop at step 6" in r0.reason and r1.reason == "received SIGUSR1"


def test_a_later_second_request_keeps_the_first_agreed_step(tmp_path):
    store = DictStore()
    r0 = ShutdownCallback(tmp_path, rank=0, supervisor_pid=None, agreement=StopAgreement(store))
    r1 = ShutdownCallback(tmp_path, rank=1, supervisor_pid=None, agreement=StopAgreement(store))
    r0.request(signal.SIGTERM, "received SIGTERM")
    assert not step(r0, 2)  # proposes 3
    r1.request(signal.SIGTERM, "received SIGTERM")
    assert not step(r1, 2)  # reads 3, does not propose 4
    assert step(r1, 3) and step(r0, 3)


def test_a_single_process_stops_at_once_without_a_store(tmp_path):
    class NoStore(StopAgreement):
        @property
        def store(self):
            return None

    cb = ShutdownCallback(tmp_path, supervisor_pid=None, agreement=NoStore())
    assert not step(cb, 1)
    cb.request(signal.SIGTERM, "received SIGTERM")
    assert step(cb, 2)
