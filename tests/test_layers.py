"""The package layout is the architecture: layers checked by import-linter, edges free of torch."""

from __future__ import annotations

import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
LAYERS = ["cli", "bench", "daemon", "engine", "core"]


def modules(package: str) -> list[str]:
    path = ROOT / "streamsed" / package
    return [f"streamsed.{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    # --no-cache: a copied tree must be analysed afresh.
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_folders_are_the_layers():
    packages = sorted(p.name for p in (ROOT / "streamsed").iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(LAYERS)
    top_level = sorted(p.name for p in (ROOT / "streamsed").glob("*.py"))
    assert top_level == ["__init__.py", "__main__.py"]  # every module lives in a layer
    for layer in LAYERS:  # each layer says what lives there and what it may import
        doc = __import__(f"streamsed.{layer}", fromlist=["_"]).__doc__
        assert doc and "import" in doc, layer


def test_the_edges_and_the_core_import_without_torch():
    """Sessions, server, MQTT, web and the core never load torch; only the engine does."""
    names = modules("core") + modules("daemon")
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
    assert "streamsed.daemon.server" in names and "streamsed.core.vad" in names


def test_the_public_api_loads_torch_only_when_used():
    code = ("import sys, streamsed.engine as e; before = 'torch' in sys.modules; "
            "e.load_engine, e.engine_from_model, e.Engine, e.EngineWorker, e.Target; print(before, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["False", "True"]


def test_lint_imports_keeps_the_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)


def _tree_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy)
    shutil.copytree(ROOT / "streamsed", copy / "streamsed", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _lint_copy(copy: Path) -> subprocess.CompletedProcess:
    # The copy, not the installed package, must be the one analysed: put it first on the path.
    env_code = f"import sys; sys.path.insert(0, {str(copy)!r}); from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", env_code, "--no-cache"], cwd=copy, capture_output=True, text=True,
                          timeout=300)


def test_lint_imports_fails_when_an_edge_imports_torch(tmp_path):
    copy = _tree_copy(tmp_path)
    assert _lint_copy(copy).returncode == 0  # the unchanged copy passes
    server = copy / "streamsed" / "daemon" / "server.py"
    server.write_text(server.read_text().replace("import asyncio\n", "import asyncio\n\nimport torch\n", 1))
    result = _lint_copy(copy)
    assert result.returncode != 0
    assert "never import torch or transformers BROKEN" in result.stdout
    assert "streamsed.daemon.server -> torch" in result.stdout


def test_lint_imports_fails_when_the_core_imports_a_layer_above(tmp_path):
    copy = _tree_copy(tmp_path)
    vad = copy / "streamsed" / "core" / "vad.py"
    vad.write_text(vad.read_text() + "\nfrom ..engine import families  # noqa\n")
    result = _lint_copy(copy)
    assert result.returncode != 0 and "Layers: cli > bench > daemon > engine > core BROKEN" in result.stdout


def test_lint_imports_fails_on_an_import_cycle(tmp_path):
    copy = _tree_copy(tmp_path)
    audio = copy / "streamsed" / "core" / "audio.py"
    audio.write_text(audio.read_text() + "\nfrom . import vad  # noqa\n")  # vad imports audio
    result = _lint_copy(copy)
    assert result.returncode != 0 and "No import cycles between modules of a package BROKEN" in result.stdout


def test_the_readme_layout_table_matches_the_tree():
    """Every module of streamsed/ is named in the README's layout table, and every name there exists."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Benchmark")]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", table, re.M):
        for path in re.findall(r"`([\w/.]+)`", cell):
            named.add(path.removeprefix("streamsed/").rstrip("/"))
    tree = {str(p.relative_to(ROOT / "streamsed")) for p in (ROOT / "streamsed").rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}
    for layer in LAYERS:
        assert layer in named, layer
    assert tree - named == set(), "modules missing from the README layout table"
    assert {n for n in named if n.endswith(".py")} - tree == set(), "the README names modules that do not exist"
