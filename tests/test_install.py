"""The package stands on its own: built and installed (not editable) from a copy of the
distribution's files, the documented commands run from a folder outside the checkout, with
only the installed packages and the environment's dependencies on the path.

The install is ``pip install --no-deps --no-build-isolation --no-index --target SITE``: no
download (setuptools, the build backend, is in every environment with torch, which requires
it), nothing written into the checkout. The checks then run in fresh interpreters whose
working directory is a temporary folder and whose ``PYTHONPATH`` is ``SITE`` alone, so
``suscept``, ``observables`` and the ``suscept.builders`` entry point come from ``SITE``
(the environment's own editable install, if any, comes after it) and ``experiments``, which
only a checkout has, is not importable."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import TOML as CONFIG  # a tiny model on the zoo language

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The distribution installed into a fresh folder from a copy of its files."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("suscept", "observables"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                          "--no-build-isolation", "--no-index", "--no-compile", "--quiet",
                          "--target", str(work / "site"), str(src)],
                         capture_output=True, text=True, cwd=work, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return work / "site"


def outside(site: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out


def documented_imports() -> set[tuple[str, str | None]]:
    """``(module, name)`` of every import in the python examples of README and docs."""
    found = set()
    for page in PAGES:
        for block in BLOCK.findall(page.read_text()):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.Import):
                    found |= {(a.name, None) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found |= {(node.module, a.name) for a in node.names}
    return {(m, n) for m, n in found if m.split(".")[0] in ("suscept", "observables")}


CHECK = """
import importlib, importlib.metadata, importlib.util, sys
site = sys.argv[1]
import observables, suscept
from suscept.inputs import builders
for mod in (suscept, observables, builders()):  # the entry point's module, from the install
    assert mod.__file__.startswith(site), mod.__file__
dist = importlib.metadata.distribution("suscept")
assert str(dist.locate_file("")).startswith(site), dist.locate_file("")
assert [e.value for e in dist.entry_points if e.group == "suscept.builders"] == \\
    ["observables.command"]
assert importlib.util.find_spec("experiments") is None, "experiments is importable"
for item in sys.argv[3:]:
    module, _, name = item.partition(":")
    m = importlib.import_module(module)
    assert not name or hasattr(m, name) or importlib.util.find_spec(module + "." + name), item
exec(compile(open(sys.argv[2]).read(), "README.md[python block 0]", "exec"), {})
print("ok")
"""


def test_installed_packages_import_and_find_their_builders(site, tmp_path):
    """Every import of the documented examples resolves in the install, and README's first
    example runs there as written."""
    wanted = sorted(f"{m}:{n or ''}" for m, n in documented_imports())
    assert "suscept:" in wanted and any(w.startswith("observables") for w in wanted)
    example = tmp_path / "readme_example.py"
    example.write_text(BLOCK.findall((ROOT / "README.md").read_text())[0])
    out = outside(site, [sys.executable, "-c", CHECK, str(site), str(example), *wanted],
                  tmp_path)
    assert out.stdout.strip().endswith("ok") and "most helpful train sample" in out.stdout


def test_documented_commands_run_outside_the_checkout(site, tmp_path):
    """``python -m suscept run CONFIG`` on the zoo language (shipped in ``observables``), then
    the ``suscept report`` console script on its folder."""
    (tmp_path / "run.toml").write_text(CONFIG)
    outside(site, [sys.executable, "-m", "suscept", "run", "run.toml", "--out", "out",
                   "--no-progress"], tmp_path)
    folder = tmp_path / "out"
    for name in ("manifest.json", "config.json", "summary.txt", "estimates/llc.pt",
                 "estimates/susceptibility.pt", "run"):
        assert (folder / name).exists(), name
    (folder / "summary.txt").unlink()
    script = site / "bin" / "suscept"
    outside(site, [sys.executable, str(script), "report", "out", "--no-plots"], tmp_path)
    assert "susceptibility" in (folder / "summary.txt").read_text()
