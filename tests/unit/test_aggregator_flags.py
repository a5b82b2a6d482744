"""Every consumer of the triage flags agrees with the one registry (services/aggregator/flags.py):
the proto enum, the policy, the store's proto mapping and review choices, the worklist query and
labels, the stylesheet, the SR and FHIR wording, the calibration report and the docs (that the
policy returns only registry flags, for any evidence and any policy: tests/unit/test_aggregator_policy.py).
Adding a flag to the registry (or to the proto) without the rest, or spelling a flag out again
somewhere in the aggregator, fails here."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from services.aggregator import flags
from services.aggregator.fhir import fhir_diagnostic_report
from services.aggregator.flags import FLAGS, PENDING, REGISTRY, SPECS
from services.aggregator.models import Study
from services.aggregator.report import StudyReport
from services.aggregator.sr import build_sr
from services.aggregator.tools.calibrate import flag_metrics
from services.aggregator.web.queries import filtered
from services.core.contracts import Flag

ROOT = Path(__file__).resolve().parents[2]
AGGREGATOR = ROOT / "services" / "aggregator"
WEB = AGGREGATOR / "web"


def test_the_registry_is_well_formed() -> None:
    names = [f.name for f in REGISTRY]
    assert len(set(names)) == len(names)
    urgencies = [f.urgency for f in REGISTRY]
    assert len(set(urgencies)) == len(urgencies), "two flags with one place in the worklist order"
    assert [f.name for f in REGISTRY if not f.is_flag] == [PENDING]
    assert max(REGISTRY, key=lambda f: f.urgency).name == PENDING, "PENDING sorts last"
    assert list(FLAGS) == sorted(FLAGS, key=lambda name: SPECS[name].urgency)
    severities = [f.severity for f in REGISTRY if f.severity is not None]
    assert len(set(severities)) == len(severities)
    for f in REGISTRY:
        assert f.label and f.text
        assert re.fullmatch(r"[A-Z][A-Z_]*", f.name), "a flag name is also a CSS class and a FHIR code"
        assert re.fullmatch(r"#[0-9a-f]{3}([0-9a-f]{3})?", f.background) and re.fullmatch(r"#[0-9a-f]{3,6}", f.color)


def test_stored_urgencies_never_change() -> None:
    """aggregator_studies.urgency holds these numbers: renumbering needs a data migration."""
    stored = {
        "URGENT": 0,
        "PNEUMONIA_SUSPECTED": 1,
        "UNCERTAIN": 2,
        "NOT_TRIAGED": 3,
        "LIKELY_HEALTHY": 4,
        "PENDING": 5,
    }
    assert {name: flags.URGENCY[name] for name in stored} == stored


def test_the_proto_enum_and_the_registry_name_the_same_flags() -> None:
    assert set(Flag.keys()) == {f.proto for f in REGISTRY}, "events.proto `enum Flag` and flags.REGISTRY differ"
    assert flags.PROTO[PENDING] == Flag.FLAG_UNSPECIFIED
    assert len(set(flags.PROTO.values())) == len(REGISTRY)
    for name in FLAGS:
        assert Flag.Name(flags.PROTO[name]) == f"FLAG_{name}"


def test_the_stylesheet_has_one_rule_per_flag_and_app_css_none() -> None:
    css = flags.css()
    for f in REGISTRY:
        rule = re.search(rf"\.badge\.flag-{f.name} \{{([^}}]*)\}}", css)
        assert rule, f"no badge rule for {f.name}"
        assert f"background: {f.background};" in rule.group(1) and f"color: {f.color};" in rule.group(1)
    assert len(re.findall(r"\.flag-", css)) == len(REGISTRY)
    # The colours live only in the registry: app.css has no flag rule, every page loads /flags.css.
    assert ".flag-" not in (WEB / "static" / "app.css").read_text()
    base = (WEB / "templates" / "base.html").read_text()
    assert base.index('href="/static/app.css"') < base.index('href="/flags.css"'), "flags.css after app.css"


def test_labels_and_report_text_cover_every_flag() -> None:
    assert set(flags.LABELS) == set(flags.REPORT_TEXT) == set(SPECS)


@pytest.mark.parametrize("name", [f.name for f in REGISTRY])
def test_the_sr_and_fhir_render_every_flag_from_the_registry(name: str) -> None:
    report = StudyReport(
        study_uid="1.2.3",
        flag=name,
        p_pneumonia=0.5,
        reason="r",
        revision=1,
        model_version="2",
        human_judgments=0,
        reviewed=False,
        updated_at=datetime.now(UTC),
    )
    finding = build_sr(report, None).ContentSequence[0].TextValue
    assert finding == f"Triage flag: {name} — {SPECS[name].text}"
    fhir = fhir_diagnostic_report(report, None)
    flag_obs = next(r for r in fhir["contained"] if r["id"] == "flag")
    coding = flag_obs["valueCodeableConcept"]["coding"][0]
    assert (coding["code"], coding["display"]) == (name, SPECS[name].text)


def test_the_worklist_filter_accepts_exactly_the_registry() -> None:
    stmt = filtered(select(Study), [*SPECS, "NOT_A_FLAG"], None, None, "all")
    values = stmt.compile().params
    chosen = next(v for v in values.values() if isinstance(v, list))
    assert sorted(chosen) == sorted(SPECS)


def test_the_calibration_report_has_every_flag_in_order() -> None:
    names = [*FLAGS, *FLAGS]
    report = flag_metrics(names, [1, 0] * len(FLAGS))
    assert list(report["flags"]) == [*FLAGS, "URGENT_OR_SUSPECTED"]
    for name in FLAGS:
        entry = report["flags"][name]
        assert ("ppv" in entry) == (name in flags.MEANS), name


def flag_spellings() -> set[str]:
    return {f.name for f in REGISTRY} | {f.proto for f in REGISTRY}


def test_no_aggregator_module_spells_a_flag_out_again() -> None:
    """Flags are named through flags.py's constants and tables, never as a string or a proto enum
    member elsewhere in the aggregator (tools and migrations included; migrations excepted)."""
    spellings = flag_spellings()
    found = []
    for path in AGGREGATOR.rglob("*.py"):
        if "migrations" in path.parts or path.name == "flags.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in spellings:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in spellings:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    for path in [*WEB.glob("templates/*.html"), *WEB.glob("static/*")]:
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)} {name}" for name in spellings if re.search(rf"\b{name}\b", text)]
    assert not found, "flags spelled out outside services/aggregator/flags.py:\n" + "\n".join(found)


def test_the_docs_list_every_flag() -> None:
    policy_doc = (ROOT / "docs" / "triage-policy.md").read_text()
    for name in FLAGS:
        assert f"`{name}`" in policy_doc, f"docs/triage-policy.md §3 does not describe {name}"
    assert "To add a flag" in (ROOT / "docs" / "architecture.md").read_text()
