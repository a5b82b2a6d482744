"""The import graph of `services` has no cycles (module-level or inside functions), no service
imports another service (they meet only through `services.core` and the broker), and the running
service (its `app.py` and everything that imports, transitively) never imports its tooling
(`services/<svc>/tools/`: DICOM makers and senders, the simulated crowd, training, the local Triton)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "inference", "labeling", "aggregator")


def module_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in (ROOT / "services").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if "contracts/pneumotriage" in rel.as_posix() or "migrations" in rel.parts:
            continue
        name = ".".join(rel.parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    graph[name].add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    assert find_cycle(module_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_service_imports_another_service() -> None:
    for module, targets in module_graph().items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in SERVICES:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") >= 1 else ""
            assert other == parts[1] or other not in SERVICES, f"{module} imports {target}"


def test_the_kernel_imports_no_service() -> None:
    """`services.core` is the bottom floor: it imports no service, not even inside a function (the
    `db` commands get the services' models from services/cli.py's table, not by name)."""
    for module, targets in module_graph().items():
        if module.startswith("services.core"):
            above = sorted(t for t in targets if not t.startswith("services.core"))
            assert above == [], f"{module} imports {above}"


def runtime_modules(graph: dict[str, set[str]], service: str) -> set[str]:
    """`services.<service>.app` and every module it imports, transitively (imports inside functions too)."""
    seen: set[str] = set()
    todo = [f"services.{service}.app"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def is_tool(module: str) -> bool:
    parts = module.split(".")
    return len(parts) >= 3 and parts[2] == "tools"


def tool_imports(graph: dict[str, set[str]], service: str) -> list[tuple[str, str]]:
    """(runtime module, tool module) for every import of a tool reachable from the service's app."""
    return sorted(
        (module, target)
        for module in runtime_modules(graph, service)
        for target in graph.get(module, ())
        if is_tool(target) and not is_tool(module)
    )


def test_the_running_services_never_import_tools() -> None:
    graph = module_graph()
    for service in SERVICES:
        runtime = runtime_modules(graph, service)
        assert f"services.{service}.app" in graph and len(runtime) > 5, f"{service}: app.py not found in the graph"
        assert tool_imports(graph, service) == [], f"{service}'s running code imports tooling"


def test_the_tools_check_finds_a_tool_import() -> None:
    graph = {
        "services.ingest.app": {"services.ingest.scp", "services.core.broker"},
        "services.ingest.scp": {"services.ingest.tools.make_dicom"},
        "services.ingest.cli": {"services.ingest.tools.send"},  # a command may use tools: not runtime
    }
    assert tool_imports(graph, "ingest") == [("services.ingest.scp", "services.ingest.tools.make_dicom")]
    assert tool_imports({"services.ingest.app": {"services.ingest.tools"}}, "ingest") == [
        ("services.ingest.app", "services.ingest.tools")
    ]


def test_every_tools_package_says_it_is_tooling() -> None:
    packages = sorted((ROOT / "services").glob("*/tools/__init__.py"))
    assert {p.parent.parent.name for p in packages} >= {"ingest", "labeling", "inference", "aggregator"}
    for init in packages:
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "not imported by the running" in doc, f"{init.relative_to(ROOT)}: docstring must say it is tooling"


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a file imports (module level or inside functions; relative imports aside)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


def importers_of(package: str, files: list[Path]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in files if package in top_level_imports(p))


def test_the_harness_stays_out_of_the_services_and_away_from_the_tests() -> None:
    """harness/ (the dev and bench harnesses: `./pt up`, the system harness, DICOM peers) is not shipped:
    no service imports it; it imports no test module; the benchmarks use it, never `tests`."""
    services = [p for p in (ROOT / "services").rglob("*.py") if "contracts/pneumotriage" not in p.as_posix()]
    harness = sorted((ROOT / "harness").glob("*.py"))
    bench = sorted((ROOT / "bench").glob("*.py"))
    assert len(services) > 100 and len(harness) > 10 and len(bench) > 10
    assert importers_of("harness", services) == []
    assert importers_of("tests", harness) == []
    assert importers_of("tests", bench) == []
    assert importers_of("harness", bench), "the benchmarks should run the system through harness/"


def test_the_import_finder_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from tests.support import wait\n    import harness.cli\n")
    assert top_level_imports(src) == {"os", "tests", "harness"}


def test_the_wheel_ships_services_only() -> None:
    """pyproject's package discovery finds `services` and its subpackages, not harness/, bench/ or tests/."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "services" in packages and "services.core" in packages
    assert {p.split(".")[0] for p in packages} == {"services"}, sorted(packages)
