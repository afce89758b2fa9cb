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


def test_suscept_imports_no_other_package_by_importlib():
    """No ``importlib.import_module("observables")`` or ``__import__`` either: the command finds
    its builders through the ``suscept.builders`` entry-point group."""
    for path in (ROOT / "suscept").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            arg = node.args[0]
            if fname in {"import_module", "__import__"} and isinstance(arg, ast.Constant):
                top = str(arg.value).split(".")[0]
                assert top not in {"observables", "experiments", "devinterp"}, \
                    f"{path.relative_to(ROOT)} imports {arg.value!r} by name"


def test_the_command_builders_are_registered():
    import importlib.metadata

    from suscept.inputs import builders

    names = {ep.name for ep in importlib.metadata.entry_points(group="suscept.builders")}
    assert "transformer_lens" in names
    b = builders()
    assert all(callable(getattr(b, f)) for f in ("build_model", "build_data", "check_data",
                                                  "build_observables", "record", "label",
                                                  "loss_fn"))


def test_observables_do_not_import_experiments():
    for path in (ROOT / "observables").rglob("*.py"):
        bad = imported_roots(path) & {"experiments", "devinterp"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
