"""Adding a FailureKind without its handler, words, ladder rule and exit handling fails here.

Each kind needs: a ``decide()`` handler (``policy.HANDLERS``), its words in a decision
(``narrative.KIND_WORDS``), a ladder — a field in the policy schema's ``ladders`` and an entry in
``LADDER_FALLBACK`` (the ladder it climbs without its own, or None: same knobs) —, a decision for it
that ends in a known exit code, and its name in the report's schema. Every give-up reason has an exit code.
"""

from __future__ import annotations

import pytest
from _loop_fakes import POLICY

from oomguard.errors import ExitCode
from oomguard.policy import (
    HANDLERS,
    LADDER_FALLBACK,
    AttemptView,
    DecisionAction,
    Failure,
    GiveUpReason,
    decide,
    load_policy,
)
from oomguard.policy.narrative import KIND_WORDS
from oomguard.policy.schema import Ladders
from oomguard.protocol import FailureKind, Phase
from oomguard.report.schema import REPORT_JSON_SCHEMA
from oomguard.supervisor.loop import GIVE_UP_EXIT


@pytest.mark.parametrize("kind", list(FailureKind))
def test_every_failure_kind_has_a_handler_words_and_a_ladder_rule(kind):
    assert kind in HANDLERS, f"decide() has no handler for {kind.value}: add one to policy/decision.py HANDLERS"
    assert KIND_WORDS.get(kind), f"no words for {kind.value} in policy/narrative.py KIND_WORDS"
    assert kind.value in Ladders.model_fields, f"the policy schema has no ladders.{kind.value} field"
    assert kind in LADDER_FALLBACK, (f"policy/ladder.py LADDER_FALLBACK has no entry for {kind.value}: say which "
                                     "ladder it climbs without its own (or None: same knobs)")
    fallback = LADDER_FALLBACK[kind]
    assert fallback is None or fallback is FailureKind.CUDA_OOM, "only the required cuda_oom ladder is a fallback"


@pytest.mark.parametrize("kind", list(FailureKind))
def test_every_failure_kind_gets_a_decision_that_ends_in_a_known_exit_code(kind):
    policy = load_policy(POLICY)
    knobs = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8}
    history = [AttemptView(n, knobs, None, Failure(kind, 3, Phase.UNKNOWN, "same error"), 3) for n in (1, 2, 3)]
    for n in range(1, len(history) + 1):
        d = decide(policy, history[:n], ())
        assert d.action in (DecisionAction.RETRY, DecisionAction.GIVE_UP) and d.reason
        if d.action is DecisionAction.GIVE_UP:
            assert d.give_up in GIVE_UP_EXIT
            break


def test_every_give_up_reason_has_an_exit_code():
    assert set(GIVE_UP_EXIT) == set(GiveUpReason)
    assert all(isinstance(code, ExitCode) and code not in (ExitCode.SUCCESS, ExitCode.INTERNAL)
               for code in GIVE_UP_EXIT.values())


def test_the_report_names_every_failure_kind():
    text = str(REPORT_JSON_SCHEMA)
    missing = [k.value for k in FailureKind if k.value not in text]
    assert not missing, f"report/schema.py does not name {missing}: the report's words must cover every kind"
