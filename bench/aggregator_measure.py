"""Measure the triage policy on the shared images: the committed model + a simulated crowd.

    python bench/aggregator_measure.py [--model-dir deploy/triton/model_repository/pneumonia/<v>]
                                       [--data ../shared/data/kermany224/train] [--out bench/results/aggregator]

1. Model: the committed ONNX (onnxruntime, the inference service's own preprocessing) on the
   model's patient-level `val` and `test` splits (services/inference/tools/training/split.json) of the
   shared training images; `test` images were never used to train or calibrate the model.
2. Crowd: simulated annotators with confusion matrices P(answer | truth) (profiles below), trust =
   their accuracy on 20 simulated gold questions (Laplace-smoothed), annotators under trust 0.6 are
   dropped (as the labeling job drops them); 3 judgments per image, 2 more when the first 3 disagree.
3. Three scorers, each calibrated with `triage calibrate`'s code on `val` (weights + thresholds for
   rule-out sensitivity >= 0.95, URGENT PPV >= 0.90, SUSPECTED PPV >= 0.85) and reported on `test`:
   fusion (model + crowd), model only, crowd only (its trust-weighted vote log-odds as the score).
Writes val.jsonl / test.jsonl (the `triage calibrate` input format), policy-*.yaml, report.json, and
prints the tables that docs/triage-policy.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.aggregator.fusion import Evidence  # noqa: E402
from services.aggregator.tools.calibrate import LabeledImage, OperatingPoints, calibrate, evaluate, load_jsonl  # noqa: E402
from services.core.calibration import sigmoid  # noqa: E402

# rows: truth pneumonia, healthy; columns: answer pneumonia, healthy, can't tell
PROFILES = {
    "expert": ((0.92, 0.05, 0.03), (0.06, 0.91, 0.03)),
    "average": ((0.80, 0.15, 0.05), (0.22, 0.73, 0.05)),
    "careless": ((0.68, 0.27, 0.05), (0.35, 0.60, 0.05)),
    "spammer": ((0.95, 0.05, 0.00), (0.95, 0.05, 0.00)),
}
CROWD = {"expert": 4, "average": 10, "careless": 8, "spammer": 3}
ANSWERS = ("pneumonia", "healthy", "cant_tell")
GOLD_QUESTIONS = 20
MIN_TRUST = 0.6


def ask(annotator: tuple[str, np.ndarray, float], y: int, rng: np.random.Generator) -> dict[str, Any]:
    _, m, trust = annotator
    answer = ANSWERS[rng.choice(3, p=m[0] if y == 1 else m[1])]
    confidence = "sure" if rng.random() < 0.7 else "probably"
    return {"answer": answer, "confidence": confidence, "trust": round(trust, 3)}


def simulate_crowd(labels: np.ndarray, seed: int) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    annotators = []
    for profile, n in CROWD.items():
        for _ in range(n):
            m = np.array(PROFILES[profile])
            gold_truth = rng.integers(0, 2, GOLD_QUESTIONS)  # 1 = pneumonia
            correct = 0
            for t in gold_truth:
                row = m[0] if t == 1 else m[1]
                a = rng.choice(3, p=row)
                correct += int((a == 0 and t == 1) or (a == 1 and t == 0))
            trust = (correct + 1) / (GOLD_QUESTIONS + 2)
            if trust >= MIN_TRUST:
                annotators.append((profile, m, trust))
    out: list[list[dict[str, Any]]] = []
    for y in labels:
        order = rng.permutation(len(annotators))
        votes = [ask(annotators[order[k]], int(y), rng) for k in range(3)]
        decided = {v["answer"] for v in votes if v["answer"] != "cant_tell"}
        if len(decided) != 1:  # dynamic judgments: disagreement (or all "can't tell") asks two more
            votes += [ask(annotators[order[k]], int(y), rng) for k in range(3, 5)]
        out.append(votes)
    return out


def model_scores(model_dir: Path, data: Path, split: str) -> tuple[list[Any], np.ndarray]:
    from services.inference.tools.evaluation import predict, select_records

    records = select_records(data, split, None)
    _, probs, _ = predict(model_dir, [r.path for r in records])
    return records, probs


def write_jsonl(path: Path, records: list[Any], probs: np.ndarray, votes: list[list[dict[str, Any]]]) -> None:
    with path.open("w") as f:
        for rec, p, v in zip(records, probs, votes, strict=True):
            row = {"id": rec.name, "group": rec.patient, "label": int(rec.label), "model_probability": float(p)}
            f.write(json.dumps({**row, "votes": v}) + "\n")


def model_only(images: list[LabeledImage]) -> list[LabeledImage]:
    return [replace(im, evidence=Evidence(im.evidence.model_probability)) for im in images]


def crowd_only(images: list[LabeledImage]) -> list[LabeledImage]:
    """The crowd's trust-weighted log-odds as the one score (calibrated like a model score)."""
    out = []
    for im in images:
        z = max(-30.0, min(30.0, im.evidence.human_logodds))
        out.append(replace(im, evidence=Evidence(sigmoid(z))))
    return out


def summarise(name: str, report: dict[str, Any]) -> dict[str, Any]:
    f = report["flags"]
    return {
        "scorer": name,
        "auc": report["score"]["auc"],
        "brier": report["score"]["brier"],
        "accuracy_at_0.5": report["score"]["accuracy_at_0.5"],
        "cleared_share": f["LIKELY_HEALTHY"]["share"],
        "cleared_count": f["LIKELY_HEALTHY"]["count"],
        "rule_out_sensitivity": f["LIKELY_HEALTHY"]["sensitivity"],
        "rule_out_npv": f["LIKELY_HEALTHY"]["npv"],
        "urgent_share": f["URGENT"]["share"],
        "urgent_ppv": f["URGENT"]["ppv"],
        "uncertain_share": f["UNCERTAIN"]["share"],
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| flag | images | share | sensitivity | specificity | PPV | NPV |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(v: Any) -> str:
        return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for flag, e in report["flags"].items():
        if flag == "NOT_TRIAGED":
            continue
        cells = [f(e.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv")]
        if flag == "UNCERTAIN":
            cells = [f"pneumonia rate {f(e.get('pneumonia_rate'))}", "", "", ""]
        lines.append(f"| {flag} | {e['count']} | {f(e['share'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="a model version dir (model.onnx + metadata)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany224" / "train")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "aggregator")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prevalence", type=float, default=None, help="state PPV/NPV at this prevalence")
    ap.add_argument("--policy-out", type=Path, default=None, help="also write the fusion policy here")
    args = ap.parse_args()

    if args.model_dir is None:
        from services.inference.tools.evaluation import latest_version_dir

        args.model_dir = latest_version_dir(ROOT / "deploy" / "triton" / "model_repository" / "pneumonia")
    args.out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[LabeledImage]] = {}
    for i, split in enumerate(("val", "test")):
        records, probs = model_scores(args.model_dir, args.data, split)
        votes = simulate_crowd(np.array([r.label for r in records]), args.seed + i)
        write_jsonl(args.out / f"{split}.jsonl", records, probs, votes)
        sets[split] = load_jsonl(args.out / f"{split}.jsonl")
        print(f"{split}: {len(records)} images, {sum(r.label for r in records)} pneumonia", flush=True)

    ops = OperatingPoints()
    results: dict[str, Any] = {"model_dir": str(args.model_dir), "seed": args.seed, "crowd": CROWD, "scorers": {}}
    for name, view in (("fusion", lambda x: x), ("model only", model_only), ("crowd only", crowd_only)):
        cal = calibrate(view(sets["val"]), ops, held_out=0.0, prevalence=args.prevalence)
        test_report = evaluate(cal.policy, view(sets["test"]), args.prevalence)
        slug = name.replace(" ", "-")
        cal.policy.meta.update({"data": "val split (bench/aggregator_measure.py)", "test": test_report})
        cal.policy.save(args.out / f"policy-{slug}.yaml")
        if name == "fusion" and args.policy_out:
            header = (
                "# Written by bench/aggregator_measure.py (pneumotriage triage calibrate's code) on the model's val\n"
                "# split + a simulated crowd; see docs/triage-policy.md. Re-run to refresh, do not hand-edit."
            )
            cal.policy.save(args.policy_out, header)
        results["scorers"][name] = {
            "thresholds": vars(cal.policy.thresholds),
            "fusion": cal.policy.fusion.to_dict(),
            "val": cal.fit_report,
            "test": test_report,
            "summary": summarise(name, test_report),
        }
        print(
            f"\n### {name} — thresholds {json.dumps({k: round(v, 4) for k, v in vars(cal.policy.thresholds).items()})}"
        )
        print(
            f"weights {json.dumps(cal.policy.fusion.to_dict()['weights'])}, intercept {cal.policy.fusion.intercept:.3f}"
        )
        print(f"\nval (fit):\n{table(cal.fit_report)}\n\ntest (held out):\n{table(test_report)}")
    print("\n| scorer (test) | AUC | Brier | acc@0.5 | cleared | rule-out sens | NPV | URGENT share | URGENT PPV |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (r["summary"] for r in results["scorers"].values()):
        print(
            f"| {s['scorer']} | {s['auc']} | {s['brier']} | {s['accuracy_at_0.5']} | "
            f"{s['cleared_count']} ({s['cleared_share']:.1%}) | {s['rule_out_sensitivity']} | {s['rule_out_npv']} | "
            f"{s['urgent_share']:.1%} | {s['urgent_ppv']} |"
        )
    (args.out / "report.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwrote {args.out}/report.json")


if __name__ == "__main__":
    main()
