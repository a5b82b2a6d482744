"""A difficulty-aware model of a non-expert crowd (signal detection), for simulation only.

Every image has a *strength toward its true class* shared by all annotators,
``s = C0 + GAMMA * margin``, where ``margin`` is the signed margin of a deliberately weak
classifier (16 x 16 thumbnails, trained on other patients; bench/labeling_difficulty.py): an image
that looks like the other class has s < 0, so most people get it wrong *in the same way* (shared
confusions). Annotator a, on their n-th answer, sees evidence toward the truth

    x = skill_a * s + noise,   noise ~ Normal(0, 1 + fatigue_a * max(0, n - FATIGUE_AFTER) / 100)

and, with e = x turned into evidence toward *pneumonia*:
- with probability ``lapse`` they answer at random (inattention), else
- "can't tell" with probability ``cant_tell`` when |e| < ``unsure_band``, else
- pneumonia when ``e + bias > 0`` (bias > 0: "when unsure, say pneumonia"),
- confidence "sure" when ``|e + bias| > sure_above``, else "probably";
- seconds ~ lognormal around ``median_s * (1 + 0.8 * exp(-|e|))`` (hard images take longer),
  5 % faster per 100 answers with fatigue.
Sleepers (adversarial, spammer) answer the quiz like a ``good`` annotator, then flip every answer /
always say pneumonia. Pure functions and a seeded numpy Generator: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

C0 = 0.25  # strength of an image the weak classifier cannot place (margin 0)
GAMMA = 0.3  # strength per unit of weak-classifier margin
FATIGUE_AFTER = 60  # answers before fatigue sets in
DEFAULT_MARGIN = 2.56  # median weak margin of the Kermany val+test images (an image of unknown difficulty)
CLASSES = ("pneumonia", "healthy")


@dataclass(frozen=True)
class Profile:
    skill: float  # mean of the annotators' skill
    skill_sd: float = 0.0  # spread of skill between annotators of this profile
    lapse: float = 0.02  # share of answers given at random
    bias: float = 0.0  # evidence added toward pneumonia ("when unsure, say pneumonia")
    fatigue: float = 0.3  # noise growth per 100 answers after FATIGUE_AFTER
    cant_tell: float = 0.3  # chance of "can't tell" inside the unsure band
    unsure_band: float = 0.25
    sure_above: float = 0.6
    median_s: float = 7.0
    behaviour: str = "honest"  # honest | flip | pneumonia (after the quiz)


PROFILES: dict[str, Profile] = {
    "expert": Profile(skill=3.0, skill_sd=0.3, lapse=0.01, fatigue=0.1, median_s=5.0),
    "good": Profile(skill=1.8, skill_sd=0.3, lapse=0.02, fatigue=0.2, median_s=6.0),
    "typical": Profile(skill=1.0, skill_sd=0.25, lapse=0.03, median_s=7.0),
    "biased": Profile(skill=1.0, skill_sd=0.25, lapse=0.03, bias=0.8, median_s=7.0),
    "careless": Profile(skill=0.8, skill_sd=0.2, lapse=0.35, fatigue=0.6, cant_tell=0.05, median_s=2.5),
    "adversarial": Profile(skill=1.8, skill_sd=0.3, behaviour="flip", median_s=4.0),
    "spammer": Profile(skill=1.8, skill_sd=0.3, behaviour="pneumonia", median_s=1.2),
}
QUIZ_PROFILE = PROFILES["good"]  # how sleepers answer the quiz


def strength(margin: float | None) -> float:
    return C0 + GAMMA * (DEFAULT_MARGIN if margin is None else margin)


@dataclass
class SimAnnotator:
    name: str
    profile_name: str
    profile: Profile
    skill: float
    answered: int = 0  # work answers so far (fatigue)

    @classmethod
    def draw(cls, name: str, profile_name: str, rng: np.random.Generator) -> SimAnnotator:
        p = PROFILES[profile_name]
        return cls(name, profile_name, p, max(0.05, float(rng.normal(p.skill, p.skill_sd))))

    def answer(
        self, truth: str, margin: float | None, rng: np.random.Generator, quiz: bool = False
    ) -> tuple[str, str, float]:
        """(answer, confidence, seconds) for an image of class truth; counts toward fatigue unless quiz."""
        p = self.profile
        skill = self.skill
        if quiz and p.behaviour != "honest":
            p, skill = replace(QUIZ_PROFILE, median_s=p.median_s), max(skill, QUIZ_PROFILE.skill)
        tired = max(0, self.answered - FATIGUE_AFTER) / 100.0
        if not quiz:
            self.answered += 1
        x = skill * strength(margin) + float(rng.normal(0.0, 1.0 + p.fatigue * tired))
        e = x if truth == "pneumonia" else -x  # evidence toward pneumonia
        seconds = p.median_s * (1 + 0.8 * math.exp(-abs(e))) * float(rng.lognormal(0.0, 0.35))
        seconds *= max(0.5, 1 - 0.05 * tired)  # tired people get faster, not better
        if rng.random() < p.lapse:
            answer = CLASSES[int(rng.integers(2))]
            confidence = "sure" if rng.random() < 0.5 else "probably"
        elif abs(e) < p.unsure_band and rng.random() < p.cant_tell:
            answer, confidence = "cant_tell", "probably"
        else:
            answer = "pneumonia" if e + p.bias > 0 else "healthy"
            confidence = "sure" if abs(e + p.bias) > p.sure_above else "probably"
        if not quiz and p.behaviour == "flip" and answer != "cant_tell":
            answer = CLASSES[1 - CLASSES.index(answer)]
        elif not quiz and p.behaviour == "pneumonia":
            answer, confidence = "pneumonia", "sure"
        return answer, confidence, round(seconds, 2)


def p_correct(skill: float, margin: float | None) -> float:
    """Chance that an honest, rested, attentive annotator of this skill answers right (no bias)."""
    return 0.5 * (1 + math.erf(skill * strength(margin) / math.sqrt(2)))


def parse_spec(spec: str) -> list[str]:
    """'typical:5,careless:3,spammer:2' -> a list of profile names, one per annotator."""
    out: list[str] = []
    for part in spec.split(","):
        name, _, count = part.strip().partition(":")
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
        out += [name] * int(count or 1)
    return out


def single_judgment_accuracy(
    profile_names: list[str], margins: np.ndarray, truths: list[str], rng: np.random.Generator
) -> float:
    """Share of right answers ("can't tell" is not right) of rested annotators drawn from the mix,
    one answer per image and annotator."""
    right = total = 0
    for m, t in zip(margins, truths, strict=True):
        for i, name in enumerate(profile_names):
            a, _c, _s = SimAnnotator.draw(f"a{i}", name, rng).answer(t, float(m), rng)
            right += a == t
            total += 1
    return right / max(total, 1)
