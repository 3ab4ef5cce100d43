"""The environment a test gives the ``oomguard`` it starts: the machine's, less every ``OOMGUARD_*`` a test or
an earlier run may have left, except ``OOMGUARD_WARM_SPARE`` (scripts/test.sh sets it to 0: on a 2-core box
the spare's imports compete with the tests' own training; the spare's tests turn it on with --warm-spare)."""

from __future__ import annotations

import os

from oomguard.supervisor.spare import ENV_WARM_SPARE

__all__ = ["user_env"]


def user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_") or k == ENV_WARM_SPARE}
