"""The contract between the supervisor and the child (DESIGN §3). Stdlib only.

Both sides import this package. One submodule per concept:

- ``env``: the environment variables given to the child, ``ResumeMode``;
- ``layout``: run-directory file names and the one per-rank file-name scheme (``rank_file``);
- ``records``: the failure vocabulary, the child's ``ErrorRecord``, injected ``Fault`` specs;
- ``events``: the event catalogue (every name in ``events.jsonl`` with its payload) and ``emit_event``;
- ``io``: atomic JSON write, append-one-line (and its kept-open form for per-step lines), torn-line-tolerant read;
- ``text``: sizes (``24GiB``) and the messages that mean a GPU OOM;
- ``secrets``: redaction of secret values in command lines;
- ``device``: what a device can do (bf16 from compute capability 8.0);
- ``run_record``: ``run.json`` as typed values (attempts, failure, rung, decision).

Every public name of every submodule is re-exported here: ``from oomguard.protocol import X``.
The knob names live in ``oomguard.knobs`` (the registry) and are re-exported as ``KNOB_*``.
"""

from __future__ import annotations

from oomguard.knobs import BATCH as KNOB_BATCH  # noqa: F401
from oomguard.knobs import CORE as CORE_KNOBS  # noqa: F401
from oomguard.knobs import GRAD_ACCUM as KNOB_GRAD_ACCUM  # noqa: F401
from oomguard.knobs import LORA_ALPHA as KNOB_LORA_ALPHA  # noqa: F401
from oomguard.knobs import LORA_R as KNOB_LORA_R  # noqa: F401
from oomguard.knobs import MAX_SEQ_LENGTH as KNOB_MAX_SEQ_LENGTH  # noqa: F401
from oomguard.knobs import PRECISION as KNOB_PRECISION  # noqa: F401
from oomguard.knobs import PRECISIONS  # noqa: F401

from . import device, env, events, io, layout, records, run_record, secrets, text
from .device import *  # noqa: F401,F403
from .env import *  # noqa: F401,F403
from .events import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .layout import *  # noqa: F401,F403
from .records import *  # noqa: F401,F403
from .run_record import *  # noqa: F401,F403
from .secrets import *  # noqa: F401,F403
from .text import *  # noqa: F401,F403

_KNOB_NAMES = ["KNOB_BATCH", "CORE_KNOBS", "KNOB_GRAD_ACCUM", "KNOB_LORA_ALPHA", "KNOB_LORA_R",
               "KNOB_MAX_SEQ_LENGTH", "KNOB_PRECISION", "PRECISIONS"]
__all__ = [*env.__all__, *layout.__all__, *records.__all__, *events.__all__, *io.__all__, *text.__all__,
           *secrets.__all__, *device.__all__, *run_record.__all__, *_KNOB_NAMES]
