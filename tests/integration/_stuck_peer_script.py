"""Two gloo ranks where rank 1 writes its error record (as the guard's ``die`` does) and then neither
rank ever ends: each waits in a receive for the other (gloo's timeout: 30 min), with a Python SIGTERM
handler that cannot run inside the wait (the guard's save-at-step-end handler is one). It stands for a
failed rank stuck in its teardown while its peers sit in a collective: the launcher sees no exit, so
only the supervisor can end the attempt. Attempt 2 onwards exits 0 at once.

Usage: torchrun --standalone --nproc-per-node 2 _stuck_peer_script.py
"""

import datetime
import os
import signal
import sys
from pathlib import Path

if os.environ.get("OOMGUARD_ATTEMPT", "1") != "1":
    sys.exit(0)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from oomguard import protocol  # noqa: E402

signal.signal(signal.SIGTERM, lambda *_: None)
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
rank = dist.get_rank()
if rank == 1:
    record = protocol.ErrorRecord(kind=protocol.FailureKind.CUDA_OOM, step=3, phase=protocol.Phase.FORWARD_BACKWARD,
                                  rank=1, detail="CUDA out of memory. Tried to allocate 2.00 GiB (stuck-peer test)")
    protocol.write_error_record(Path(os.environ[protocol.ENV_ERROR_FILE]), record)
buf = torch.zeros(1)
dist.recv(buf, src=1 - rank)  # both wait for the other: forever, as far as this test goes
