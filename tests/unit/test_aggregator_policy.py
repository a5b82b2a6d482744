"""Triage policy properties (hypothesis): more pneumonia evidence never lowers urgency, for any
thresholds and any non-negative fusion weights; plus the study-level rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregator.flags import HEALTHY, NOT_TRIAGED, PENDING, SEVERITY, SPECS, SUSPECTED, UNCERTAIN, URGENT
from services.aggregator.fusion import FEATURES, Evidence, FusionWeights, Vote
from services.aggregator.policy import ImageResult, Policy, Thresholds, study_result

votes_st = st.lists(
    st.builds(
        Vote,
        answer=st.sampled_from(["pneumonia", "healthy", "cant_tell"]),
        confidence=st.sampled_from(["sure", "probably"]),
        trust=st.floats(0.3, 1.0),
    ),
    max_size=6,
)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    cuts = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3)))
    weights = FusionWeights(
        intercept=draw(st.floats(-3, 3)),
        weights={f: draw(st.floats(0.0, 3.0)) for f in FEATURES},
    )
    thresholds = Thresholds(
        rule_out=cuts[0],
        suspected=cuts[1],
        urgent=cuts[2],
        conflict_model_p=draw(st.floats(0.05, 0.95)),
        conflict_human_logodds=draw(st.floats(-2.0, 2.0)),
    )
    return Policy(weights, thresholds)


evidence_st = st.builds(
    Evidence,
    model_probability=st.none() | st.floats(0.0, 1.0),
    votes=votes_st.map(tuple),
    aggregate_p=st.none() | st.floats(0.0, 1.0),
    gate=st.sampled_from(["", "ok", "borderline", "refuse"]),
)


@settings(max_examples=300, deadline=None)
@given(policies(), st.lists(evidence_st, min_size=1, max_size=4))
def test_the_policy_emits_only_registry_flags(policy: Policy, images: list[Evidence]) -> None:
    """Image and study flags are always rows of the registry (services/aggregator/flags.py)."""
    results = []
    for ev in images:
        flag, p, reason = policy.classify(ev)
        assert flag in SPECS, flag
        results.append(ImageResult(flag, p, reason))
    assert study_result(results)[0] in SPECS


def severity(policy: Policy, ev: Evidence) -> int:
    flag, _, _ = policy.classify(ev)
    assert flag in SEVERITY, flag
    return SEVERITY[flag]


@settings(max_examples=300, deadline=None)
@given(policies(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), votes_st)
def test_higher_model_score_never_lowers_urgency(policy: Policy, p1: float, p2: float, votes: list[Vote]) -> None:
    lo, hi = sorted((p1, p2))
    assert severity(policy, Evidence(hi, tuple(votes))) >= severity(policy, Evidence(lo, tuple(votes)))


@settings(max_examples=300, deadline=None)
@given(policies(), st.floats(0.0, 1.0), votes_st, st.floats(0.3, 1.0), st.sampled_from(["sure", "probably"]))
def test_one_more_pneumonia_vote_never_lowers_urgency(
    policy: Policy, p: float, votes: list[Vote], trust: float, confidence: str
) -> None:
    before = Evidence(p, tuple(votes))
    after = Evidence(p, (*votes, Vote("pneumonia", confidence, trust)))
    assert severity(policy, after) >= severity(policy, before)


@settings(max_examples=300, deadline=None)
@given(policies(), st.floats(0.0, 1.0), votes_st, st.data())
def test_turning_a_vote_to_pneumonia_or_dropping_a_healthy_vote_never_lowers_urgency(
    policy: Policy, p: float, votes: list[Vote], data: st.DataObject
) -> None:
    healthy = [i for i, v in enumerate(votes) if v.answer == "healthy"]
    if not healthy:
        return
    i = data.draw(st.sampled_from(healthy))
    flipped = list(votes)
    flipped[i] = Vote("pneumonia", votes[i].confidence, votes[i].trust)
    dropped = votes[:i] + votes[i + 1 :]
    base = severity(policy, Evidence(p, tuple(votes)))
    assert severity(policy, Evidence(p, tuple(flipped))) >= base
    assert severity(policy, Evidence(p, tuple(dropped))) >= base


def test_flags_follow_the_thresholds() -> None:
    policy = Policy(FusionWeights(), Thresholds(urgent=0.9, suspected=0.7, rule_out=0.2))
    assert policy.classify(Evidence(0.95))[0] == URGENT
    assert policy.classify(Evidence(0.8))[0] == SUSPECTED
    assert policy.classify(Evidence(0.5))[0] == UNCERTAIN
    assert policy.classify(Evidence(0.05))[0] == HEALTHY
    assert policy.classify(Evidence())[0] == PENDING
    # Humans alone never clear a study: LIKELY_HEALTHY needs a model score.
    flag, p, reason = policy.classify(Evidence(None, (Vote("healthy", "sure", 0.95),) * 3))
    assert flag == UNCERTAIN and p is not None and p < 0.2 and "no model score" in reason
    # The model says pneumonia, three good annotators say healthy: the fused P is low but not cleared.
    flag, p, reason = policy.classify(Evidence(0.6, (Vote("healthy", "sure", 0.9),) * 3))
    assert flag == UNCERTAIN and "disagrees" in reason


def test_study_takes_the_most_urgent_triaged_image() -> None:
    r = ImageResult
    assert study_result([r(HEALTHY, 0.05, "a"), r(URGENT, 0.97, "b")])[:2] == (URGENT, 0.97)
    assert study_result([r(NOT_TRIAGED, None, "view LL"), r(HEALTHY, 0.05, "a")])[0] == HEALTHY
    assert study_result([r(NOT_TRIAGED, None, "view LL")]) == (NOT_TRIAGED, None, "view LL")
    # one image cleared, one still waiting: not cleared yet
    assert study_result([r(HEALTHY, 0.05, "a"), r(PENDING, None, "")])[0] == UNCERTAIN
    assert study_result([r(PENDING, None, "")])[0] == PENDING


def test_policy_file_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = Policy(FusionWeights(intercept=0.3), Thresholds(urgent=0.93, suspected=0.6, rule_out=0.12))
    policy.save(tmp_path / "p.yaml", "# header")
    loaded = Policy.load(tmp_path / "p.yaml")
    assert loaded.thresholds == policy.thresholds
    assert loaded.fusion.intercept == 0.3
