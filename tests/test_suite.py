"""The test suite's own layering (DESIGN.md "Tests"): one helpers module, and no test module imports another.

``tests/helpers.py`` holds what tests share; ``tests/stalling_model.py`` is a fixture module (a model
the command line loads by import path in a child process, as it loads a user's), not a test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = {"tests.helpers"}  # what a test module may import from the tests package


def imports_of_tests(source: str) -> set[str]:
    """The ``tests.*`` modules a source imports anywhere (deferred imports and relative ones included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "tests" if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            if node.module is None or module == "tests":  # `from tests import x`: x may be a module
                found |= {f"tests.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("tests.")}


def optimize_builders(source: str) -> list[int]:
    """Lines where a list starting with "optimize" is assigned or returned: a builder of the optimize command line."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign, ast.Return)) else None
        if isinstance(value, ast.List) and value.elts:
            first = value.elts[0]
            if isinstance(first, ast.Constant) and first.value == "optimize":
                lines.append(node.lineno)
    return lines


def test_no_test_module_imports_another() -> None:
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 10
    imports = {path.name: imports_of_tests(path.read_text()) - SHARED for path in modules}
    assert {name: sorted(found) for name, found in imports.items() if found} == {}


def test_the_import_scan_sees_deferred_relative_and_package_imports() -> None:
    source = (
        "import tests.test_a\nfrom tests.helpers import run_cli\nfrom . import test_b\nfrom .test_c import x\n"
        "from tests import test_d\n\ndef f():\n    from tests.test_e import y\n"
    )
    assert imports_of_tests(source) == {f"tests.test_{c}" for c in "abcde"} | {"tests.helpers"}


def test_the_optimize_command_line_is_built_in_the_helpers_alone() -> None:
    builders = {path.name: optimize_builders(path.read_text()) for path in sorted(TESTS.glob("*.py"))}
    assert {name: len(lines) for name, lines in builders.items() if lines} == {"helpers.py": 1}


def test_the_builder_scan_sees_assigned_and_returned_command_lines() -> None:
    source = 'A = ["optimize", "-q"]\ndef f():\n    return ["optimize"]\nrun(["optimize"])\nB: list = ["train"]\n'
    assert optimize_builders(source) == [1, 3]
