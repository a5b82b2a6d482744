"""Crowd labeling benchmark: final-label accuracy against judgments per image, for majority vote,
plain Dawid-Skene, the service's v1 policy and ours, on three simulated crowds.

The same real images for every method: `--images` (240) work images from the model's `test`
split and 48 gold images (4 examples, 16 quiz, 28 hidden) from its `val` split (other patients),
with the difficulty (weak-classifier margin) and the committed model's probability from
bench/data/labeling-difficulty.csv (`python bench/labeling_difficulty.py` rebuilds it).

Each crowd is simulated with the difficulty-aware annotator model (services/labeling/tools/crowd_model.py)
through the job's own rules (services/labeling/jobs/pneumonia-v1.yaml): the quiz (each attempt on
unseen items, at most quiz_attempts), hidden gold at hidden_ratio, Beta trust and stopping (the
stopped annotator's answers dropped, their images reopened), images handed out most-judged first,
re-aggregation every 10 answers and the dynamic-judgment rule of the service
(`quality.judgments_needed`). Annotators work concurrently in simulated time (each takes their own
answer times), so fast spammers get many images before gold stops them, as on a real platform.

Methods (the crowd and its random draws are the same for every method of one seed):
- majority vote, k answers per image (k = 1, 3, 5, 7), ties -> pneumonia;
- plain Dawid-Skene (full confusion matrices, no gold clamping, no smoothing), the same k;
- service v1: Dawid-Skene with gold clamped, smoothing 1, 3 answers then one more while the
  posterior is below 0.95, cap 7 (what `pneumotriage labeling` does today);
- ours: v1 + confidence ("probably" vs "sure", pooled factor) + the model's probability as a prior
  (CROWDLAB-style), starting at 1 answer per image; swept over the target posterior.

    python bench/labeling.py                          # 3 crowds x 3 seeds, writes docs/labeling-accuracy.png
    python bench/labeling.py --seeds 1 --json var/bench/labeling.json

Accuracy is against the data set's labels (Kermany et al.), which are themselves not perfect.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.labeling.job import JobDefinition, load_job  # noqa: E402
from services.labeling.quality import beta_trust, dawid_skene, judgments_needed, majority_vote  # noqa: E402
from services.labeling.tools.crowd_model import SimAnnotator, parse_spec  # noqa: E402

DIFFICULTY = ROOT / "bench" / "data" / "labeling-difficulty.csv"
CLASSES = ("pneumonia", "healthy")
RESPONSES = ("pneumonia", "healthy", "cant_tell")
CROWDS = {
    "typical crowd": "good:4,typical:14,biased:2",
    "30 % careless or biased": "good:3,typical:11,careless:3,biased:3",
    "with cheaters": "good:3,typical:11,careless:2,adversarial:2,spammer:2",
}
AGG_EVERY = 10


@dataclass
class Image:
    name: str
    truth: int  # index in CLASSES
    margin: float
    p_model: float  # P(pneumonia)


@dataclass(frozen=True)
class Method:
    name: str
    aggregator: str  # mv | ds_plain | ds_gold | ours
    k_min: int
    cap: int
    target: float = 1.01  # > 1: never confident, i.e. fixed k = k_min = cap
    use_conf: bool = False
    use_prior: bool = False
    prior_clip: float = 0.01


@dataclass
class Run:
    posteriors: np.ndarray
    work_judgments: int  # every answer given on a work image (stopped annotators' too)
    valid_judgments: int
    gold_judgments: int
    stopped: int
    quiz_failed: int
    complete: int
    single_accuracy: float
    extra: dict = field(default_factory=dict)


def load_images(path: Path, n_work: int, n_gold: int, seed: int) -> tuple[list[Image], list[Image]]:
    rows = list(csv.DictReader(open(path, newline="")))
    rng = np.random.default_rng(seed)

    def img(r: dict) -> Image:
        return Image(r["file"], CLASSES.index(r["label"]), float(r["weak_margin"]), float(r["p_model"]))

    test = [r for r in rows if r["split"] == "test"]
    work = [img(test[i]) for i in sorted(rng.permutation(len(test))[:n_work])]
    val = [r for r in rows if r["split"] == "val"]
    gold: list[Image] = []
    patients: set[str] = set()
    for label in CLASSES:  # balanced, one image per patient
        pick = [r for r in val if r["label"] == label]
        got = 0
        for i in rng.permutation(len(pick)):
            if got >= n_gold // 2:
                break
            if pick[i]["patient"] not in patients:
                patients.add(pick[i]["patient"])
                gold.append(img(pick[i]))
                got += 1
    order = rng.permutation(len(gold))
    return work, [gold[i] for i in order]


def take_quiz(ann: SimAnnotator, pool: list[Image], job: JobDefinition, rng: np.random.Generator) -> bool:
    """The entry quiz: each attempt on quiz items not seen before, at most quiz_attempts."""
    seen: set[int] = set()
    n = job.gold.quiz_length
    for _attempt in range(job.gold.quiz_attempts):
        fresh = [i for i in rng.permutation(len(pool)) if i not in seen]
        if len(fresh) < n:
            return False
        items = fresh[:n]
        seen.update(items)
        right = sum(
            ann.answer(CLASSES[pool[i].truth], pool[i].margin, rng, quiz=True)[0] == CLASSES[pool[i].truth]
            for i in items
        )
        if right / n >= job.gold.quiz_pass_mark:
            return True
    return False


def aggregate(
    method: Method,
    work: list[Image],
    hidden: list[Image],
    judg: list[tuple[int, int, int, bool]],
    stopped: set[int],
    n_ann: int,
) -> np.ndarray:
    """(n_work, 2) posteriors from the valid answers. judg: (item, annotator, response, unsure); item
    indices >= len(work) are hidden gold."""
    nw = len(work)
    valid = [j for j in judg if j[1] not in stopped]
    if method.aggregator in ("mv", "ds_plain"):
        valid = [j for j in valid if j[0] < nw]
    if not valid:
        return np.full((nw, 2), 0.5)
    items = np.array([j[0] for j in valid])
    workers = np.array([j[1] for j in valid])
    responses = np.array([j[2] for j in valid])
    if method.aggregator == "mv":
        return majority_vote(items, responses, nw, 2)
    n_items = nw if method.aggregator == "ds_plain" else nw + len(hidden)
    if len(valid) < 20:  # as the service: too little for EM
        return majority_vote(items, responses, n_items, 2)[:nw]
    if method.aggregator == "ds_plain":
        agg = dawid_skene(items, workers, responses, n_items, n_ann, 2, 3)
        return agg.posteriors
    known = {nw + h: img.truth for h, img in enumerate(hidden)}
    prior = None
    if method.use_prior:
        p = np.array([img.p_model for img in work] + [0.5] * len(hidden))
        prior = np.stack([p, 1 - p], axis=1)
    agg = dawid_skene(
        items,
        workers,
        responses,
        n_items,
        n_ann,
        2,
        3,
        known=known,
        smoothing=1.0,
        unsure=np.array([j[3] for j in valid]) if method.use_conf else None,
        item_prior=prior,
        prior_clip=method.prior_clip,
    )
    return agg.posteriors[:nw]


def simulate(method: Method, spec: str, work: list[Image], gold: list[Image], job: JobDefinition, seed: int) -> Run:
    rng = np.random.default_rng(seed)
    names = parse_spec(spec)
    anns = [SimAnnotator.draw(f"a{i}", p, rng) for i, p in enumerate(names)]
    quiz_pool = gold[: job.quiz_pool]
    hidden = gold[job.quiz_pool :]
    passed = [take_quiz(a, quiz_pool, job, rng) for a in anns]
    nw = len(work)
    judg: list[tuple[int, int, int, bool]] = []
    judged: list[set[int]] = [set() for _ in anns]
    gold_n = [0] * len(anns)
    gold_right = [0] * len(anns)
    stopped: set[int] = set()
    post = np.full((nw, 2), 0.5)
    needed = np.full(nw, method.k_min)
    complete = np.zeros(nw, bool)
    valid_n = np.zeros(nw, int)
    right_single = total_single = 0

    def refresh() -> None:
        nonlocal post, needed, complete, valid_n
        post = aggregate(method, work, hidden, judg, stopped, len(anns))
        valid_n = np.bincount([j[0] for j in judg if j[0] < nw and j[1] not in stopped], minlength=nw)
        for i in range(nw):
            conf = float(post[i].max())
            if method.target > 1:
                needed[i] = method.k_min
            else:
                needed[i] = judgments_needed(int(valid_n[i]), conf, method.k_min, method.cap, method.target)
            complete[i] = valid_n[i] > 0 and needed[i] <= valid_n[i]

    queue = [(float(rng.exponential(10.0)), a) for a in range(len(anns)) if passed[a]]
    heapq.heapify(queue)
    since = 0
    while queue and not complete.all():
        now, a = heapq.heappop(queue)
        hidden_left = [h for h in range(len(hidden)) if nw + h not in judged[a]]
        item: int | None = None
        if hidden_left and rng.random() < job.gold.hidden_ratio:
            item = nw + hidden_left[int(rng.integers(len(hidden_left)))]
        else:
            open_ = [i for i in range(nw) if not complete[i] and valid_n[i] < needed[i] and i not in judged[a]]
            if not open_:
                refresh()
                open_ = [i for i in range(nw) if not complete[i] and valid_n[i] < needed[i] and i not in judged[a]]
            if open_:
                item = max(open_, key=lambda i: (valid_n[i], -i))  # finish images in progress first
            elif hidden_left and not complete.all():
                item = nw + hidden_left[int(rng.integers(len(hidden_left)))]
        if item is None:
            continue  # nothing left for this annotator: they leave
        img = work[item] if item < nw else hidden[item - nw]
        answer, confidence, seconds = anns[a].answer(CLASSES[img.truth], img.margin, rng)
        judged[a].add(item)
        r = RESPONSES.index(answer)
        judg.append((item, a, r, confidence == "probably"))
        if item < nw:
            valid_n[item] += 1
            if anns[a].profile.behaviour == "honest":
                right_single += r == img.truth
                total_single += 1
        else:
            gold_n[a] += 1
            gold_right[a] += r == img.truth
            trust = beta_trust(gold_right[a], gold_n[a], job.trust.prior_correct, job.trust.prior_wrong)
            if gold_n[a] >= job.trust.min_gold and trust < job.trust.threshold:
                stopped.add(a)
                refresh()
                continue
        heapq.heappush(queue, (now + seconds, a))
        since += 1
        if since >= AGG_EVERY:
            refresh()
            since = 0
    refresh()
    work_j = sum(1 for j in judg if j[0] < nw)
    return Run(
        posteriors=post,
        work_judgments=work_j,
        valid_judgments=int(valid_n.sum()),
        gold_judgments=len(judg) - work_j,
        stopped=len(stopped),
        quiz_failed=sum(1 for p in passed if not p),
        complete=int(complete.sum()),
        single_accuracy=right_single / max(total_single, 1),
    )


def methods() -> list[Method]:
    out: list[Method] = []
    for k in (1, 3, 5, 7):
        out.append(Method(f"majority vote, k={k}", "mv", k, k))
        out.append(Method(f"plain Dawid-Skene, k={k}", "ds_plain", k, k))
    out.append(Method("service v1 (DS + gold, 3 then dynamic to 0.95)", "ds_gold", 3, 7, 0.95))
    out.append(Method("ours without model prior (target 0.95, from 2)", "ours", 2, 7, 0.95, use_conf=True))
    for target in (0.9, 0.95, 0.97, 0.98, 0.99):
        out.append(Method(f"ours, target {target}", "ours", 1, 7, target, use_conf=True, use_prior=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--gold", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--difficulty", type=Path, default=DIFFICULTY)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "labeling-accuracy.png")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--headline", default="ours, target 0.97", help="the method reported against the goal")
    args = ap.parse_args()
    job = load_job()
    work, gold = load_images(args.difficulty, args.images, args.gold, seed=11)
    truth = np.array([w.truth for w in work])
    print(
        f"{len(work)} work images ({int((truth == 0).sum())} pneumonia) from the test split, {len(gold)} gold "
        f"from the val split; job {job.key}; {args.seeds} seed(s)"
    )
    model_acc = float(np.mean((np.array([w.p_model for w in work]) < 0.5).astype(int) == truth))
    print(f"the committed model alone (p >= 0.5 -> pneumonia): accuracy {model_acc:.3f} on these images")
    t0 = time.monotonic()
    results: dict[str, dict[str, dict]] = {}
    for crowd, spec in CROWDS.items():
        results[crowd] = {"model alone (no annotators)": {"accuracy": model_acc, "judgments_per_image": 0.0}}
        for m in methods():
            runs = [simulate(m, spec, work, gold, job, seed) for seed in range(1, args.seeds + 1)]
            acc = [float(np.mean(r.posteriors.argmax(axis=1) == truth)) for r in runs]
            results[crowd][m.name] = {
                "accuracy": float(np.mean(acc)),
                "accuracy_min": float(np.min(acc)),
                "judgments_per_image": float(np.mean([r.work_judgments / len(work) for r in runs])),
                "valid_per_image": float(np.mean([r.valid_judgments / len(work) for r in runs])),
                "gold_per_image": float(np.mean([r.gold_judgments / len(work) for r in runs])),
                "complete": float(np.mean([r.complete / len(work) for r in runs])),
                "stopped": float(np.mean([r.stopped for r in runs])),
                "quiz_failed": float(np.mean([r.quiz_failed for r in runs])),
                "single_judgment_accuracy": float(np.mean([r.single_accuracy for r in runs])),
            }
        print(f"\n## {crowd} ({spec})")
        print("| method | accuracy (min over seeds) | judgments / image | + gold / image | stopped | quiz failed |")
        print("|---|---|---|---|---|---|")
        for name, r in results[crowd].items():
            if "complete" not in r:
                print(f"| {name} | {r['accuracy']:.3f} | 0 | 0 | - | - |")
                continue
            print(
                f"| {name} | {r['accuracy']:.3f} ({r['accuracy_min']:.3f}) | {r['judgments_per_image']:.2f} | "
                f"{r['gold_per_image']:.2f} | {r['stopped']:.1f} | {r['quiz_failed']:.1f} |"
            )
        single = results[crowd]["majority vote, k=1"]["single_judgment_accuracy"]
        print(f"single-judgment accuracy of honest annotators (k=1 run): {single:.3f}")
    print(f"\n{time.monotonic() - t0:.0f} s")
    head = {c: results[c][args.headline] for c in CROWDS}
    print(
        "headline "
        + args.headline
        + ": "
        + "; ".join(
            f"{c}: {h['accuracy']:.3f} at {h['judgments_per_image']:.2f} judgments/image" for c, h in head.items()
        )
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


def plot(results: dict[str, dict[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=True)
    for ax, (crowd, res) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for prefix, style, label in (
            ("majority vote", "o--", "majority vote (k = 1, 3, 5, 7)"),
            ("plain Dawid-Skene", "s--", "plain Dawid-Skene (k = 1, 3, 5, 7)"),
            ("ours, target", "D-", "ours (target 0.9 ... 0.99)"),
        ):
            pts = sorted((r["judgments_per_image"], r["accuracy"]) for n, r in res.items() if n.startswith(prefix))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        for n, r in res.items():
            if n.startswith("service v1"):
                ax.plot([r["judgments_per_image"]], [r["accuracy"]], "k^", label="service v1 (DS + gold, dynamic)")
            if n.startswith("ours without"):
                ax.plot([r["judgments_per_image"]], [r["accuracy"]], "gD", mfc="none", label="ours without model prior")
            if n.startswith("model alone"):
                ax.plot([0.0], [r["accuracy"]], "r*", ms=10, label="model alone")
        ax.axhline(0.97, color="grey", lw=0.8, ls=":")
        ax.axvline(3.0, color="grey", lw=0.8, ls=":")
        ax.set_title(crowd)
        ax.set_xlabel("answers per work image (all, incl. stopped annotators')")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("final-label accuracy")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
