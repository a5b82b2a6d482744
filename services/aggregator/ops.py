"""The operations / ML page (`/ops`, admin role; JSON at `/api/v1/ops`): what an operator and an ML
engineer check first, on one page, read from where each fact lives.

- **Results to the PACS**: each SR destination's queue, breaker and last failure (service.py
  `sr_health`; issue 23).
- **Lanes**: per stage (inference, labeling, aggregator) and lane (fresh, backfill) the messages
  waiting in RabbitMQ and the consumers, and from the services' `/metrics` the age of the oldest and
  the drain rate with an ETA (services/core/status.py, the same as `pneumotriage status`; issue 24).
- **Models**: the versions that scored images in the last 24 h (what really served), the version the
  model repository pins, each version's held-out test figures, a site candidate's paired comparison
  with its base on the site's locked test set (written by `model adapt`), the promotions log
  (`model promote`), the site calibration in force and the version it was fitted on, and the drift
  monitor (issue 28). Shadow predictions are not read here: they live in the inference service's own
  store (`pneumotriage model compare`).

The model repository is read as files (metadata.json, config.pbtxt, promotions.jsonl): the
aggregator does not import the inference service.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from services.aggregator.models import PredictionRow
from services.core.db.outbox import utcnow

log = logging.getLogger(__name__)
MODEL = "pneumonia"
_PINNED = re.compile(r"versions\s*:\s*\[?\s*(\d+)")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    """A figure of metadata.json's metrics: a number, or {"value": ..., "ci95": [...]}."""
    value = metrics.get(key)
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, int | float) else None


PLOT = 180  # px, the square of each plot
PAD = 24


def _xy(x: float, y: float) -> str:
    return f"{PAD + x * PLOT:.1f},{PAD + (1.0 - y) * PLOT:.1f}"


def _plots(curves: Any) -> dict[str, Any] | None:
    """SVG coordinates for the page: each version's ROC polyline and operating point, and its
    reliability points (radius by images); None when the comparison has no curves."""
    if not isinstance(curves, dict) or not all(isinstance(curves.get(k), dict) for k in ("candidate", "reference")):
        return None
    out: dict[str, Any] = {"size": PLOT + 2 * PAD, "pad": PAD, "plot": PLOT}
    for name in ("candidate", "reference"):
        c = curves[name]
        op = c.get("operating_point")
        total = sum(n for _, _, n in c.get("reliability", [])) or 1
        out[name] = {
            "roc": " ".join(_xy(x, y) for x, y in c.get("roc", [])),
            "operating_point": _xy(*op).split(",") if op else None,
            "reliability": [
                {"at": _xy(mean, rate).split(","), "r": round(2 + 8 * (n / total) ** 0.5, 1), "n": n}
                for mean, rate, n in c.get("reliability", [])
            ],
        }
    return out


def repository_versions(repository: Path) -> dict[str, Any]:
    """The model repository's versions as files say: pinned version, per version its test figures and
    (a site candidate) the locked-set comparison, and the promotions log, newest first."""
    model_dir = repository / MODEL
    config = model_dir / "config.pbtxt"
    pinned = None
    if config.is_file():
        match = _PINNED.search(config.read_text())
        pinned = int(match.group(1)) if match else None
    versions: list[dict[str, Any]] = []
    found = model_dir.iterdir() if model_dir.is_dir() else iter(())
    numbers = sorted((int(p.name) for p in found if p.name.isdigit()), reverse=True)
    for number in numbers:
        meta = _json(model_dir / str(number) / "metadata.json") or {}
        metrics = meta.get("metrics") or {}
        test = metrics.get("test") or {}
        row: dict[str, Any] = {
            "version": number,
            "trained_at": meta.get("trained_at") or meta.get("exported_at") or "",
            "test_auc": _metric(test, "auc"),
            "test_sensitivity": _metric(test, "sensitivity"),
            "test_specificity": _metric(test, "specificity"),
            "operating_threshold": (meta.get("thresholds") or {}).get("operating"),
            "site": (meta.get("site_adaptation") or {}).get("site", ""),
            "base_version": (meta.get("site_adaptation") or {}).get("base_version"),
            "locked": None,
        }
        locked = metrics.get("locked_site_test")
        if isinstance(locked, dict) and "difference" in locked:
            row["locked"] = {
                "n_images": locked.get("n_images"),
                "candidate_auc": locked["candidate"].get("auc"),
                "reference_auc": locked["reference"].get("auc"),
                "candidate_sensitivity": locked["candidate"].get("sensitivity"),
                "reference_sensitivity": locked["reference"].get("sensitivity"),
                "candidate_specificity": locked["candidate"].get("specificity"),
                "reference_specificity": locked["reference"].get("specificity"),
                "difference": {k: locked["difference"][k] for k in ("auc", "sensitivity", "specificity")},
                "agreement": locked.get("agreement"),
                "plots": _plots(locked.get("curves")),
            }
        versions.append(row)
    promotions: list[dict[str, Any]] = []
    log_file = model_dir / "promotions.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            keep = ("at", "kind", "version", "previous", "user", "reason")
            promotions.append({k: entry.get(k) for k in keep})
    served = pinned if pinned is not None else (numbers[0] if numbers else None)  # unpinned: the newest
    return {
        "pinned": pinned,
        "served": served,
        "versions": versions,
        "promotions": promotions[::-1][:20],
    }


async def serving_versions(agg: Any, hours: float = 24.0) -> list[dict[str, Any]]:
    """Model versions that scored images in the last `hours` (current predictions), most first."""
    since = utcnow() - timedelta(hours=hours)
    async with agg.sessions() as session:
        rows = (
            await session.execute(
                select(PredictionRow.model_name, PredictionRow.model_version, func.count(PredictionRow.id))
                .where(PredictionRow.stored_at >= since, PredictionRow.superseded_by == "")
                .group_by(PredictionRow.model_name, PredictionRow.model_version)
                .order_by(func.count(PredictionRow.id).desc())
            )
        ).all()
    return [{"model": m, "version": v, "images": int(n)} for m, v, n in rows]


async def lanes(amqp_url: str, metrics_urls: tuple[str, ...]) -> dict[str, Any]:
    """Per stage and lane: waiting, consumers, oldest, drain rate, ETA (services/core/status.py)."""
    from services.core import status

    table = status.rows()
    try:
        await status.sample(amqp_url, table, metrics_urls)
    except Exception as exc:  # the broker may be down: the page still shows the rest
        log.warning("ops page: lanes not sampled", extra={"error": repr(exc)[:300]})
        return {"error": f"broker not reachable: {type(exc).__name__}", "rows": []}
    return {
        "error": "",
        "rows": [
            {
                "stage": r.stage,
                "lane": r.lane,
                "queue": r.queue,
                "waiting": r.depth,
                "consumers": r.consumers,
                "oldest_age_s": r.oldest_age_s,
                "rate_per_s": r.rate,
                "eta_s": r.eta_s,
            }
            for r in table
        ],
    }


async def ops_report(agg: Any) -> dict[str, Any]:
    s = agg.settings
    site = agg.site.to_dict() if agg.site is not None else None
    serving = await serving_versions(agg)
    repo = await asyncio.to_thread(repository_versions, Path(s.drift_reference_dir))  # files: off the loop
    warnings: list[str] = []
    if site is not None and serving and all(v["version"] != site["model_version"] for v in serving):
        warnings.append(
            f"the site calibration in force (v{site['version']}) was fitted on model version "
            f"{site['model_version']}, which scored nothing in the last 24 h: re-fit it "
            "(pneumotriage triage recalibrate)"
        )
    if repo["served"] is not None and serving and all(v["version"] != str(repo["served"]) for v in serving):
        warnings.append(f"the repository serves version {repo['served']}, but no image was scored by it in 24 h")
    return {
        "sr_delivery": await agg.sr_health() if agg.destinations else None,
        "lanes": await lanes(s.amqp_url, tuple(u for u in s.ops_metrics_urls.split(",") if u.strip())),
        "models": {
            "serving_24h": serving,
            "repository": repo,
            "site_calibration": site,
            "drift": agg.drift.status.to_dict(),
            "warnings": warnings,
        },
    }
