"""The shape of the package: imports point one way, and the declarations load no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kdsearch"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(path: Path, known: set[str]) -> set[str]:
    """The kdsearch modules a module imports, at its top or inside functions (deferred), not for type checking."""
    found: set[str] = set()
    skipped: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_deferred_import_cycle(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = tmp_path / "kdsearch" / "x.py"
    source.parent.mkdir()
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kdsearch.z\n"
        "def f():\n    from kdsearch import y\n"
    )
    assert imported(source, {"kdsearch", "kdsearch.y", "kdsearch.z"}) == {"kdsearch.y"}


def test_no_module_of_kdsearch_imports_itself_back() -> None:
    known = modules()
    graph = {name: imported(path, set(known)) - {name} for name, path in known.items()}
    assert "kdsearch.weighted_sum" in graph["kdsearch.loop"]  # the walk sees real imports
    assert find_cycle(graph) is None


def test_a_default_config_is_built_and_validated_without_torch() -> None:
    code = (
        "import sys\n"
        "from kdsearch.config import RunConfig\n"
        "from kdsearch.strategies import METHODS, get_strategy\n"
        "config = RunConfig()\n"
        "assert config.loss.params == {'soft_target_weight': 0.25, 'temperature': 2.0}, config.loss.params\n"
        "for method in METHODS:\n"
        "    get_strategy(method).hyperparameters({})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_strategy_imports_another_and_every_term_builds_from_its_declared_parameters() -> None:
    import inspect

    from kdsearch.strategies import METHODS
    from kdsearch.terms import TERMS, get_term

    strategy_modules = {f"kdsearch.strategies.{m}" for m in METHODS}
    for method in METHODS:
        path = PACKAGE / "strategies" / f"{method}.py"
        assert not imported(path, set(modules())) & strategy_modules, method
    for name in TERMS:
        build = __import__(f"kdsearch.losses.{name}", fromlist=["build"]).build
        keywords = {p.name for p in inspect.signature(build).parameters.values() if p.kind is p.KEYWORD_ONLY}
        declared = set(get_term(name).params)
        assert keywords == declared or (name == "ce" and keywords == {"label_smoothing"}), name


def test_every_kdsearch_name_the_bench_scripts_import_exists() -> None:
    """bench/ imports kdsearch inside functions that only a benchmark run reaches: check each name here."""
    import importlib

    bench = PACKAGE.parent / "bench"
    missing = []
    for path in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kdsearch":
                module = importlib.import_module(node.module)
                names = [a.name for a in node.names if f"{node.module}.{a.name}" not in modules()]
                missing += [f"{path.name}: {node.module}.{name}" for name in names if not hasattr(module, name)]
    assert not missing
