"""Imports flow one way: experiments -> observables -> suscept."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_suscept_imports_neither_observables_nor_experiments_nor_devinterp():
    for path in (ROOT / "suscept").rglob("*.py"):
        bad = imported_roots(path) & {"observables", "experiments", "devinterp", "tests"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_observables_do_not_import_experiments():
    for path in (ROOT / "observables").rglob("*.py"):
        bad = imported_roots(path) & {"experiments", "devinterp"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
