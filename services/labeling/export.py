"""Exports: the labeled dataset for ML engineers (CSV + JSONL + job report) and the same job for a
crowd vendor (Appen: CML form, instructions HTML, data CSV, test-question CSV)."""

from __future__ import annotations

import asyncio
import csv
import html
import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.labeling.job import JobDefinition
from services.labeling.models import JudgmentRow, Task, User
from services.labeling.stats import job_summary

DATASET_COLUMNS = [
    "task_id",
    "sop_instance_uid",
    "study_instance_uid",
    "sha256",
    "storage_uri",
    "source_file",
    "final_label",
    "p_pneumonia",
    "posterior_source",
    "confidence",
    "method",
    "judgments",
    "complete",
    "revision",
    "input_gate",
    "input_gate_reason",
]


def posterior_source(method: str | None) -> str | None:
    """Where an image's posterior comes from: "crowd" (annotators only: Dawid-Skene or trust-weighted
    majority), "crowd + model prior" (a method run with the model's probability as a prior, e.g. the
    bench's), "clinician" (a clinician's label, which takes precedence). None before any judgment."""
    if not method:
        return None
    if method.startswith("clinician"):
        return "clinician"
    return "crowd + model prior" if "+model" in method else "crowd"


async def export_dataset(s: AsyncSession, job: JobDefinition, out: Path) -> dict[str, Any]:
    """labels.csv (one row per image), labels.jsonl (plus every judgment), judgments.csv, job-report.json/.md.

    Annotators appear only by pseudonym. Images are identified by DICOM UIDs + sha256 so that ML engineers
    can join to the image store; this file is for the owner and ML team, never for annotators.
    """
    tasks = (await s.scalars(select(Task).where(Task.kind == "work").order_by(Task.created_at, Task.id))).all()
    users = {u.id: u for u in (await s.scalars(select(User))).all()}
    rows = (
        await s.scalars(select(JudgmentRow).where(JudgmentRow.state != "undone").order_by(JudgmentRow.submitted_at))
    ).all()
    by_task: dict[str, list[JudgmentRow]] = {}
    for r in rows:
        by_task.setdefault(r.task_id, []).append(r)

    def judgment_dict(r: JudgmentRow) -> dict[str, Any]:
        u = users[r.user_id]
        return {
            "judgment_id": r.id,
            "annotator_id": u.pseudonym,
            "annotator_status": u.status,
            "answer": r.answer,
            "confidence": r.confidence,
            "cant_tell_reason": r.cant_tell_reason,
            "click": [r.click_x, r.click_y] if r.click_x is not None else None,
            "seconds_spent": round(r.seconds_spent, 2),
            "trust_at_submit": round(r.trust_at_submit, 4),
            "is_gold": r.is_gold,
            "correct": r.correct,
            "state": r.state,
            "context": r.context,
            "job_version": r.job_key,
            "submitted_at": r.submitted_at.isoformat(),
        }

    labels: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for t in tasks:
        rec = {
            "task_id": t.id,
            "sop_instance_uid": t.sop_instance_uid,
            "study_instance_uid": t.study_instance_uid,
            "sha256": t.sha256,
            "storage_uri": t.storage_uri,  # the stored DICOM (file:// URI) for images from PACS
            "source_file": t.source_path,  # images added from files (add-images) instead of PACS
            "final_label": t.final_label,
            "p_pneumonia": None if t.p_pneumonia is None else round(t.p_pneumonia, 6),
            "posterior_source": posterior_source(t.method),
            "confidence": None if t.confidence is None else round(t.confidence, 6),
            "method": t.method,
            "judgments": t.judgments,
            "complete": t.status == "complete",
            "revision": t.revision,
            # the input gate's verdict on the image: ok | borderline (a refused image has no task and is
            # never exported); empty for a task made with the gate off or before labeling ran it
            "input_gate": t.gate_verdict,
            "input_gate_reason": t.gate_reason,
        }
        labels.append(rec)
        records.append({**rec, "is_gold": False, "all_judgments": [judgment_dict(r) for r in by_task.get(t.id, [])]})
    gold = (await s.scalars(select(Task).where(Task.kind.in_(("example", "quiz", "hidden"))))).all()
    for g in gold:
        records.append(
            {
                "task_id": g.id,
                "is_gold": True,
                "gold_kind": g.kind,
                "gold_label": g.gold_label,
                "p_pneumonia": 1.0 if g.gold_label == "pneumonia" else 0.0,
                "posterior_source": "gold (data set label)",
                "source": Path(g.source_path or "").name,
                "all_judgments": [judgment_dict(r) for r in by_task.get(g.id, [])],
            }
        )
    judgments = [{"task_id": r.task_id, **judgment_dict(r)} for r in rows]
    summary = await job_summary(s, job)
    summary["job_definition"] = json.loads(job.model_dump_json())
    await asyncio.to_thread(write_dataset, out, labels, records, judgments, summary)
    return summary


def write_dataset(
    out: Path,
    labels: list[dict[str, Any]],
    records: list[dict[str, Any]],
    judgments: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, DATASET_COLUMNS)
        writer.writeheader()
        writer.writerows(labels)
    with open(out / "labels.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    with open(out / "judgments.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(judgments[0]) if judgments else ["task_id"])
        writer.writeheader()
        writer.writerows(judgments)
    (out / "job-report.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "job-report.md").write_text(report_markdown(summary))


def report_markdown(s: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str = ".3f") -> str:
        return "–" if v is None else format(v, spec)

    lines = [
        f"# Labeling job report: {s['job']}",
        "",
        f"- images: {s['images']} ({s['complete']} complete, {s['open']} open); final labels: {s['final_labels']}",
        f"- borderline images (input gate; `input_gate` column): {s['borderline_images']}",
        f"- images the input gate refused (no task, no cost, not exported): {s['skipped_by_gate']}"
        + "".join(f"; {check} {n}" for check, n in s["skipped_by_check"].items()),
        f"- judgments paid: {s['judgments_paid']} (test questions: {s['gold_judgments']})",
        f"- mean judgments per complete image: {fmt(s['mean_judgments_per_complete_image'], '.2f')}",
        f"- Fleiss' kappa: {fmt(s['fleiss_kappa'])}; Krippendorff's alpha (nominal): {fmt(s['krippendorff_alpha'])}",
        f"- cost so far: {s['cost_so_far']:.2f} {s['currency']}; per final label: "
        f"{fmt(s['cost_per_final_label'], '.4f')} {s['currency']}",
        "",
        "| annotator | status | judgments | test questions | accuracy | trust |",
        "|---|---|---|---|---|---|",
    ]
    for a in s["annotators"]:
        lines.append(
            f"| {a['pseudonym']} | {a['status']} | {a['judgments']} | {a['gold_answered']} | "
            f"{fmt(a['gold_accuracy'], '.2f')} | {a['trust']:.2f} |"
        )
    lines += ["", f"Contested test questions: {len(s['contested_gold'])}", ""]
    lines += [
        f"- {g['task_id']} ({g['kind']}, gold {g['gold_label']}): {g['disagree']:.0%} disagree"
        for g in s["contested_gold"]
    ]
    return "\n".join(lines) + "\n"


def appen_cml(job: JobDefinition) -> str:
    """CML (Appen / Figure Eight markup) for the same question, confidence and can't-tell reasons."""
    answers = "\n".join(f'    <cml:radio label="{html.escape(a.label)}" value="{a.value}" />' for a in job.answers)
    conf = "\n".join(f'    <cml:radio label="{html.escape(c.label)}" value="{c.value}" />' for c in job.confidence)
    reasons = "\n".join(
        f'    <cml:radio label="{html.escape(r)}" value="{html.escape(r)}" />' for r in job.cant_tell_reasons
    )
    return f"""<img src="{{{{image_url}}}}" alt="Chest X-ray to judge" width="512" />
<cml:radios label="{html.escape(job.question)}" name="answer" validates="required" gold="true">
{answers}
</cml:radios>
<cml:radios label="How sure are you?" name="confidence" validates="required">
{conf}
</cml:radios>
<cml:radios label="If you can't tell, why?" name="cant_tell_reason" only-if="answer:[cant_tell]" validates="required">
{reasons}
</cml:radios>
"""


def appen_instructions(job: JobDefinition, examples: list[Task]) -> str:
    items = "".join(f"<li><strong>{html.escape(a.label)}</strong>: {html.escape(a.help)}.</li>" for a in job.answers)
    ex = "".join(
        f'<figure><img src="images/{t.id}.png" alt="{html.escape(t.gold_label or "")} example" width="300">'
        f"<figcaption>{html.escape(t.gold_reason or '')} (example {t.id})</figcaption></figure>"
        for t in examples
    )
    return f"""<h1>{html.escape(job.title)}</h1>
<p>{html.escape(job.purpose)}</p>
<p>{html.escape(job.question)} Look at both lungs and at the diaphragm.</p>
<ul>{items}</ul>
<p>Say how sure you are. If you cannot judge the image, answer "Can't tell" and give a reason.
Some images are test questions; if you miss one you will see the reason.</p>
<h2>Examples</h2>
{ex}
"""


async def export_appen(s: AsyncSession, job: JobDefinition, out: Path, render: Any) -> dict[str, int]:
    """render(task) -> Path of the task's PNG (the caller renders/caches). Images are copied under images/
    and referenced by relative URL: upload them to your own bucket and rewrite image_url before launch."""
    tasks = (await s.scalars(select(Task).order_by(Task.kind, Task.id))).all()
    examples = [t for t in tasks if t.kind == "example"]
    items = [(t.id, t.kind, t.gold_label, t.gold_reason, render(t)) for t in tasks]
    settings = {
        "title": job.title,
        "judgments_per_unit": job.redundancy.judgments_per_image,
        "max_judgments_per_unit": job.redundancy.max_judgments,
        "min_unit_confidence": job.redundancy.target_confidence,
        "test_question_ratio": job.gold.hidden_ratio,
        "quiz_mode_questions": job.gold.quiz_length,
        "minimum_accuracy": job.trust.threshold,
        "payment_per_judgment": job.pay.per_judgment,
        "currency": job.pay.currency,
        "job_version": job.key,
    }
    files = {"job.cml": appen_cml(job), "instructions.html": appen_instructions(job, examples)}
    files["job-settings.json"] = json.dumps(settings, indent=2)
    return await asyncio.to_thread(write_appen, out, files, items)


def write_appen(out: Path, files: dict[str, str], items: list[tuple[str, str, Any, Any, Path]]) -> dict[str, int]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    n_data = n_gold = n_examples = 0
    with open(out / "data.csv", "w", newline="") as fd, open(out / "test_questions.csv", "w", newline="") as fg:
        data = csv.writer(fd)
        gold = csv.writer(fg)
        data.writerow(["task_id", "image_url"])
        gold.writerow(["task_id", "image_url", "_golden", "answer_gold", "answer_gold_reason"])
        for task_id, kind, label, reason, png in items:
            shutil.copyfile(png, out / "images" / f"{task_id}.png")
            url = f"images/{task_id}.png"
            if kind == "work":
                data.writerow([task_id, url])
                n_data += 1
            elif kind in ("quiz", "hidden"):
                gold.writerow([task_id, url, "true", label, reason])
                n_gold += 1
            else:
                n_examples += 1
    return {"units": n_data, "test_questions": n_gold, "examples": n_examples}
