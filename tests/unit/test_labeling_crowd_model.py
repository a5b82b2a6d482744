"""The difficulty-aware crowd model: right answers depend on skill AND image difficulty, errors on
hard images are shared, some annotators lean to pneumonia, fatigue, answer times, sleepers; and the
model's single-judgment accuracy on the real images lands in the published 75-81 % range."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from services.labeling.tools.crowd_model import PROFILES, SimAnnotator, p_correct, parse_spec, single_judgment_accuracy

DIFFICULTY = Path(__file__).resolve().parents[2] / "bench" / "data" / "labeling-difficulty.csv"


def accuracy(profile: str, margin: float, truth: str = "pneumonia", n: int = 3000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    right = 0
    for i in range(n):
        ann = SimAnnotator.draw(f"a{i}", profile, rng)
        right += ann.answer(truth, margin, rng)[0] == truth
    return right / n


def test_right_answers_depend_on_difficulty_and_skill() -> None:
    for profile in ("good", "typical", "careless"):
        easy, medium, hard = (accuracy(profile, m) for m in (5.0, 1.0, -2.0))
        assert easy > medium + 0.05 > hard + 0.1, (profile, easy, medium, hard)
    for margin in (5.0, 1.0):
        assert accuracy("expert", margin) > accuracy("good", margin) > accuracy("typical", margin)
        assert accuracy("typical", margin) > accuracy("careless", margin)
    assert p_correct(1.0, 3.0) > p_correct(1.0, 0.0) > p_correct(1.0, -2.0)
    assert p_correct(2.0, 1.0) > p_correct(1.0, 1.0)


def test_hard_images_mislead_everybody_the_same_way() -> None:
    """On an image that looks like the other class most annotators of every honest profile are wrong,
    so more votes do not fix it (shared confusions)."""
    for profile in ("good", "typical", "biased"):
        assert accuracy(profile, -3.0, truth="healthy") < 0.5, profile
    assert accuracy("typical", 4.0, truth="healthy") > 0.85


def test_pneumonia_bias_when_unsure() -> None:
    rng = np.random.default_rng(1)
    said = {}
    for profile in ("typical", "biased"):
        anns = [SimAnnotator.draw(f"{profile}{i}", profile, rng) for i in range(300)]
        answers = [a.answer("healthy", 0.5, rng)[0] for a in anns for _ in range(5)]
        said[profile] = answers.count("pneumonia") / len(answers)
    assert said["biased"] > said["typical"] + 0.15, said
    # the bias acts when unsure: it costs less on clear healthy images than on unclear ones
    cost_clear = accuracy("typical", 5.0, truth="healthy") - accuracy("biased", 5.0, truth="healthy")
    cost_unclear = accuracy("typical", 0.5, truth="healthy") - accuracy("biased", 0.5, truth="healthy")
    assert 0 < cost_clear < cost_unclear, (cost_clear, cost_unclear)


def test_sure_answers_are_more_often_right() -> None:
    rng = np.random.default_rng(2)
    right = {"sure": [0, 0], "probably": [0, 0]}
    for i in range(4000):
        ann = SimAnnotator.draw(f"a{i}", "typical", rng)
        answer, conf, _s = ann.answer("pneumonia", float(rng.normal(2.0, 2.0)), rng)
        right[conf][0] += answer == "pneumonia"
        right[conf][1] += 1
    assert right["sure"][0] / right["sure"][1] > right["probably"][0] / right["probably"][1] + 0.1


def test_fatigue_over_long_sessions() -> None:
    rng = np.random.default_rng(3)
    fresh = tired = 0
    n = 400
    for i in range(n):
        ann = SimAnnotator.draw(f"a{i}", "typical", rng)
        fresh += ann.answer("pneumonia", 2.0, rng)[0] == "pneumonia"
        ann.answered = 400
        tired += ann.answer("pneumonia", 2.0, rng)[0] == "pneumonia"
    assert tired < fresh - 0.05 * n, (fresh, tired)


def test_answer_times_are_realistic() -> None:
    rng = np.random.default_rng(4)

    def median_s(profile: str, margin: float) -> float:
        return float(
            np.median([SimAnnotator.draw("a", profile, rng).answer("healthy", margin, rng)[2] for _ in range(500)])
        )

    assert 3.0 < median_s("typical", 2.5) < 15.0
    assert median_s("typical", 0.0) > median_s("typical", 6.0)  # hard images take longer
    assert median_s("spammer", 2.5) < median_s("careless", 2.5) < median_s("typical", 2.5)


def test_sleepers_answer_the_quiz_well_then_cheat() -> None:
    rng = np.random.default_rng(5)
    for profile in ("adversarial", "spammer"):
        ann = SimAnnotator.draw("s", profile, rng)
        quiz = [ann.answer("healthy", 3.0, rng, quiz=True)[0] for _ in range(200)]
        work = [ann.answer("healthy", 3.0, rng)[0] for _ in range(200)]
        assert quiz.count("healthy") > 150 and work.count("healthy") < 40, profile
        assert ann.answered == 200  # quiz answers do not tire


def test_single_judgment_accuracy_matches_published_crowds() -> None:
    """Brady et al. report 75-81 % single-judgment accuracy for non-expert crowds on medical images;
    the model's typical crowd (before any quiz) on the real images lands there."""
    rows = list(csv.DictReader(open(DIFFICULTY, newline="")))
    margins = np.array([float(r["weak_margin"]) for r in rows])
    truths = [r["label"] for r in rows]
    acc = single_judgment_accuracy(parse_spec("good:4,typical:14,biased:2"), margins, truths, np.random.default_rng(6))
    assert 0.75 <= acc <= 0.81, acc
    assert {"expert", "careless", "adversarial", "spammer"} <= set(PROFILES)
