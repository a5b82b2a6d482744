"""`pneumotriage model list | status`: what the live model repository holds and serves, read from the
repository itself (config.pbtxt, each version's metadata.json and drift_reference.json) and the
deploy registry (deployments.jsonl, written by `model deploy`), plus, when asked, what a running
Triton or inference service actually serves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.inference.config import DEFAULT_MODEL_REPOSITORY
from services.inference.tools.cli_errors import fail

console = Console()


def _metadata(vdir: Path) -> dict[str, Any]:
    try:
        return json.loads((vdir / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}


def _value(v: Any) -> float | None:
    if isinstance(v, dict):
        v = v.get("value")
    return float(v) if isinstance(v, int | float) else None


def version_summary(repository: Path, name: str, version: int) -> dict[str, Any]:
    """One version's figures and lineage, from its own files."""
    from services.core.drift import REFERENCE_FILE

    vdir = repository / name / str(version)
    meta = _metadata(vdir)
    test = (meta.get("metrics") or {}).get("test") or {}
    gate = meta.get("quality_gate") or {}
    candidate = gate.get("candidate") or {}
    drift = None
    if (vdir / REFERENCE_FILE).is_file():
        try:
            ref = json.loads((vdir / REFERENCE_FILE).read_text())
            drift = {"n": ref.get("n"), "source": ref.get("source"), "positive_rate": ref.get("positive_rate")}
        except (OSError, ValueError):
            drift = {"error": "unreadable"}
    return {
        "version": version,
        "trained_at": meta.get("trained_at"),
        "deployed_at": meta.get("deployed_at"),
        "deployed_from": meta.get("deployed_from"),
        "git_commit": meta.get("git_commit"),
        "data_sha256": meta.get("data_sha256"),
        "threshold": (meta.get("thresholds") or {}).get("operating"),
        "test": {k: _value(test.get(k)) for k in ("auc", "sensitivity", "specificity") if k in test} or None,
        "quality_gate": {
            "passed": gate.get("passed"),
            "forced": gate.get("forced"),
            "reason": gate.get("reason"),
            "auc": candidate.get("auc"),
            "sensitivity": candidate.get("sensitivity"),
            "reference": (gate.get("reference") or {}).get("split"),
            "against": (gate.get("active") or {}).get("version"),
        }
        if gate
        else None,
        "drift_reference": drift,
    }


def served_by_inference(url: str) -> list[dict[str, str]]:
    """pt_inference_model_info series of a running inference service's /metrics."""
    import httpx

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    out = []
    for line in text.splitlines():
        if line.startswith("pt_inference_model_info{") and line.rstrip().endswith(" 1.0"):
            out.append(dict(re.findall(r'(\w+)="([^"]*)"', line)))
    return out


def served_by_triton(url: str, name: str) -> list[str]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        index = client.get_model_repository_index(as_json=True, client_timeout=10)
    finally:
        client.close()
    return sorted(
        str(m.get("version")) for m in index.get("models", []) if m.get("name") == name and m.get("state") == "READY"
    )


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "-"


def list_cmd(
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, "--repository", help="the live model repository"),
    name: str = typer.Option("pneumonia", "--model-name"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Every version in the live repository: which one is active, its figures, gate and drift reference."""
    from services.inference.deploy import active_version
    from services.inference.repository import list_versions, read_version_policy

    model_root = repository / name
    if not (model_root / "config.pbtxt").is_file():
        fail(f"{model_root / 'config.pbtxt'} does not exist: not a model repository")
    pinned = read_version_policy((model_root / "config.pbtxt").read_text())
    active = active_version(repository, name)
    rows = [version_summary(repository, name, v) | {"active": v == active} for v in list_versions(model_root)]
    if as_json:
        typer.echo(json.dumps({"model": name, "pinned": pinned, "active": active, "versions": rows}, indent=1))
        return
    table = Table(title=f"{name} in {repository} (pinned: {pinned or 'none, the newest is served'})")
    for col in ("", "version", "trained", "deployed", "test AUC", "test sens", "quality gate", "drift ref"):
        table.add_column(col)
    for r in rows:
        gate = r["quality_gate"]
        verdict = (
            "-"
            if gate is None
            else "passed"
            if gate["passed"]
            else f"FORCED: {escape(str(gate['reason']))}"
            if gate["forced"]
            else "failed"
        )
        test = r["test"] or {}
        table.add_row(
            "*" if r["active"] else "",
            str(r["version"]),
            (r["trained_at"] or "-")[:10],
            (r["deployed_at"] or "committed")[:16],
            _fmt(test.get("auc")),
            _fmt(test.get("sensitivity")),
            verdict,
            "yes" if r["drift_reference"] else "no",
        )
    console.print(table)
    console.print("* active (what the embedded runtime loads and Triton is pinned to)")


def status_cmd(
    repository: Path = typer.Option(DEFAULT_MODEL_REPOSITORY, "--repository", help="the live model repository"),
    name: str = typer.Option("pneumonia", "--model-name"),
    triton_url: str = typer.Option(None, "--triton-url", help="also ask this Triton which version it serves"),
    inference_url: str = typer.Option(
        None, "--inference-url", help="also ask this inference service (e.g. http://127.0.0.1:8002) what it serves"
    ),
    history: int = typer.Option(5, "--history", help="deploy attempts to show from the registry"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of text"),
) -> None:
    """The active version (pinned and served), its metrics, drift reference and lineage, the last deploys."""
    from services.inference.deploy import active_version, read_registry
    from services.inference.repository import read_version_policy

    model_root = repository / name
    if not (model_root / "config.pbtxt").is_file():
        fail(f"{model_root / 'config.pbtxt'} does not exist: not a model repository")
    pinned = read_version_policy((model_root / "config.pbtxt").read_text())
    active = active_version(repository, name)
    status: dict[str, Any] = {
        "model": name,
        "repository": str(repository),
        "pinned": pinned,
        "active": active,
        "version": version_summary(repository, name, active) if active is not None else None,
        "deploys": read_registry(repository, name)[-history:] if history else [],
    }
    problems: list[str] = []
    if triton_url:
        try:
            status["triton_serves"] = served_by_triton(triton_url, name)
        except Exception as exc:
            problems.append(f"Triton at {triton_url} did not answer: {str(exc)[:200]}")
        else:
            if active is not None and status["triton_serves"] != [str(active)]:
                problems.append(f"Triton serves {status['triton_serves']} but version {active} is active")
    if inference_url:
        try:
            status["inference_serves"] = served_by_inference(inference_url)
        except Exception as exc:
            problems.append(f"inference service at {inference_url} did not answer: {str(exc)[:200]}")
        else:
            versions = sorted({s.get("version", "") for s in status["inference_serves"]})
            if not versions:
                problems.append("the inference service has not answered a batch yet (no pt_inference_model_info)")
            elif active is not None and versions != [str(active)]:
                problems.append(f"the inference service serves {versions} but version {active} is active (restart it)")
    status["problems"] = problems
    if as_json:
        typer.echo(json.dumps(status, indent=1, default=str))
    else:
        _print_status(status)
    if problems:
        raise typer.Exit(1)


def _print_status(status: dict[str, Any]) -> None:
    v = status["version"]
    console.print(f"model {status['model']} in {status['repository']}")
    console.print(
        f"active version: {status['active'] if status['active'] is not None else 'none'}"
        f" (pinned in config.pbtxt: {status['pinned'] or 'no, the newest is served'})"
    )
    if "triton_serves" in status:
        console.print(f"Triton serves: {', '.join(status['triton_serves']) or 'nothing'}")
    if "inference_serves" in status:
        served = [f"v{s.get('version')} ({s.get('runtime')})" for s in status["inference_serves"]]
        console.print(f"inference service answered with: {', '.join(served) or 'nothing yet'}")
    if v:
        test = v["test"] or {}
        console.print(
            f"test split: AUC {_fmt(test.get('auc'))}, sensitivity {_fmt(test.get('sensitivity'))}, "
            f"specificity {_fmt(test.get('specificity'))} at threshold {_fmt(v['threshold'], 3)}"
        )
        gate = v["quality_gate"]
        if gate:
            how = "passed" if gate["passed"] else f"FORCED past it ({gate['reason']})" if gate["forced"] else "failed"
            console.print(
                f"quality gate: {how}; AUC {_fmt(gate['auc'])}, sensitivity {_fmt(gate['sensitivity'])} "
                f"on the {gate['reference']} reference, against version {gate['against'] or '-'}",
                markup=False,
            )
        else:
            console.print("quality gate: no record (a version that predates `model deploy`'s gate)")
        d = v["drift_reference"]
        console.print(
            f"drift reference: {d['n']} predictions ({d['source']}), positive rate {_fmt(d['positive_rate'], 3)}"
            if d and "n" in d
            else "drift reference: none (the drift monitor cannot judge this version: `model drift-reference`)"
        )
        console.print(
            f"lineage: trained {v['trained_at'] or '-'} from data {str(v['data_sha256'] or '-')[:12]} "
            f"at commit {str(v['git_commit'] or '-')[:12]}; deployed {v['deployed_at'] or '- (committed)'}"
            + (f" from {v['deployed_from']}" if v["deployed_from"] else ""),
            markup=False,
        )
    for d in status["deploys"]:
        console.print(
            f"  {d.get('at')} {d.get('user')}: {d.get('action')} v{d.get('version', '?')} "
            f"(was {d.get('previous')}) {d.get('outcome')}"
            + (f", forced: {d.get('reason')}" if d.get("forced") else "")
            + (f": {d.get('error')}" if d.get("error") else ""),
            markup=False,
        )
    for p in status["problems"]:
        console.print(f"[red]problem:[/red] {escape(p)}")


def register(model_group: typer.Typer) -> None:
    model_group.command("list")(list_cmd)
    model_group.command("status")(status_cmd)
