"""The compatibility matrix (issue 16 item 3): the same tests on two stacks.

In ``.venv`` (the current stack) they run with the rest of the suite; ``scripts/compat.sh`` runs them
again in ``.venv-old`` (the pinned stack of ``requirements-old.txt``) with ``OOMGUARD_COMPAT_STACK=old``,
under which every pin must be what is really installed (else every test errors: a green run on the
wrong stack would prove nothing).

The integration tests' helpers are reused, not copied: ``tests/integration`` goes on ``sys.path`` (for
``_wrap_run``) and its conftest's fixtures (the embedded tiny model, the shipped dataset) are re-exported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent / "integration"
SHOWN = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub")

if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

from _compat_checks import STACK, installed, pins  # noqa: E402  (needs tests/integration on sys.path)

_spec = importlib.util.spec_from_file_location("_oomguard_integration_conftest", INTEGRATION / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)
model_dir = _integration.model_dir
data_dir = _integration.data_dir


def pytest_report_header(config):
    return f"oomguard compat stack: {STACK}: " + ", ".join(f"{n} {installed(n)}" for n in SHOWN)


@pytest.fixture(scope="session", autouse=True)
def the_stack_is_the_one_named():
    """Under OOMGUARD_COMPAT_STACK=old every pin of requirements-old.txt is installed exactly."""
    assert STACK in ("current", "old"), f"OOMGUARD_COMPAT_STACK={STACK!r}: expected 'current' or 'old'"
    if STACK == "old":
        wrong = {n: (v, installed(n)) for n, v in pins().items() if installed(n) != v}
        assert not wrong, f"not the pinned old stack (pinned, installed): {wrong}"
    return STACK


# The two wrapped trainings cost about 1.5 CPU-minutes on the current stack, where the integration suite
# already runs the same paths (tests/integration/test_resume_wrapped.py: trl sft through an OOM with an
# exact resume; test_wrap_commands.py: trl sft's NaN rung in force, the plain Trainer script through an OOM;
# test_resume_wrapped_packed.py). CI is CPU-bound on 2 cores, so there they run on the old stack only;
# OOMGUARD_COMPAT_CURRENT=1 runs them on the current stack too (`pytest tests/compat`).
TRAININGS = ("test_compat_trainer.py", "test_compat_trl.py")


def pytest_collection_modifyitems(session, config, items):
    if STACK == "old" or os.environ.get("OOMGUARD_COMPAT_CURRENT") == "1":
        return
    trainings = [it for it in items if Path(str(it.fspath)).name in TRAININGS
                 and Path(str(it.fspath)).parent == HERE]
    if trainings:
        config.hook.pytest_deselected(items=trainings)
        items[:] = [it for it in items if it not in trainings]
