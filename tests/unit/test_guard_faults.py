from oomguard.guard.callbacks.faults import FaultLedger, due_faults
from oomguard.protocol import parse_inject


def test_fault_fires_once_across_attempts(tmp_path):
    faults = parse_inject("cuda_oom@step=5")
    path = tmp_path / "injected.json"
    ledger = FaultLedger(path)
    assert due_faults(faults, ledger, kind="cuda_oom", rank=0, attempt=1, step=4) == []
    due = due_faults(faults, ledger, kind="cuda_oom", rank=0, attempt=1, step=5)
    assert due == faults
    ledger.mark(due[0])
    # a resumed attempt reads the ledger afresh and passes step 5 again
    resumed = FaultLedger(path)
    assert due_faults(faults, resumed, kind="cuda_oom", rank=0, attempt=2, step=5) == []
    assert due_faults(faults, resumed, kind="cuda_oom", rank=0, attempt=2, step=9) == []


def test_rank_attempt_and_kind_filters():
    faults = parse_inject("nan@step=2,rank=1;crash@step=3,attempt=2;eval_oom")
    ledger = FaultLedger(None)
    assert due_faults(faults, ledger, kind="nan", rank=0, attempt=1, step=2) == []
    assert len(due_faults(faults, ledger, kind="nan", rank=1, attempt=1, step=2)) == 1
    assert due_faults(faults, ledger, kind="crash", rank=0, attempt=1, step=3) == []
    assert len(due_faults(faults, ledger, kind="crash", rank=0, attempt=2, step=3)) == 1
    assert len(due_faults(faults, ledger, kind="eval_oom", rank=0, attempt=1, step=0)) == 1


def test_torn_ledger_is_not_fatal(tmp_path):
    path = tmp_path / "injected.json"
    path.write_text('["cuda_oom@st')
    ledger = FaultLedger(path)
    assert due_faults(parse_inject("cuda_oom@step=1"), ledger, kind="cuda_oom", rank=0, attempt=1, step=1)
