"""The triage policy and the input gate: a refused image is NOT_TRIAGED with the gate's reason
whatever the model and the crowd say; a borderline one is UNCERTAIN (never URGENT or LIKELY_HEALTHY);
no gate verdict (an older inference version) or "ok" changes nothing."""

from __future__ import annotations

from services.aggregator.flags import HEALTHY, NOT_TRIAGED, UNCERTAIN, URGENT
from services.aggregator.fusion import Evidence, Vote
from services.aggregator.policy import ImageResult, study_result
from tests.support.aggregator_service import TEST_POLICY


def test_refused_is_not_triaged_with_the_reason() -> None:
    ev = Evidence(model_probability=0.999, votes=(Vote("pneumonia"),) * 3, gate="refuse", gate_reason="too small")
    flag, p, reason = TEST_POLICY.classify(ev)
    assert (flag, p) == (NOT_TRIAGED, None)
    assert reason == "input gate: too small"


def test_borderline_is_uncertain_at_both_ends() -> None:
    for prob in (0.999, 0.001):
        flag, p, reason = TEST_POLICY.classify(Evidence(model_probability=prob, gate="borderline", gate_reason="odd"))
        assert flag == UNCERTAIN and p is not None
        assert reason.startswith("input gate: odd")


def test_ok_or_no_gate_changes_nothing() -> None:
    for gate in ("", "ok"):
        assert TEST_POLICY.classify(Evidence(model_probability=0.99, gate=gate))[0] == URGENT
        assert TEST_POLICY.classify(Evidence(model_probability=0.01, gate=gate))[0] == HEALTHY


def test_a_refused_image_does_not_hide_the_others_of_its_study() -> None:
    refused = ImageResult(*TEST_POLICY.classify(Evidence(model_probability=0.99, gate="refuse", gate_reason="x")))
    healthy = ImageResult(*TEST_POLICY.classify(Evidence(model_probability=0.01)))
    assert study_result([refused, healthy])[0] == HEALTHY
    assert study_result([refused])[:2] == (NOT_TRIAGED, None)
