"""The package's architecture holds: the import-linter contracts in pyproject.toml (layers of sub-packages, no
cycles between sibling modules, function-level imports counted), every sub-package placed in a layer, and
modules short enough to read in one sitting (docs/architecture.md)."""

import os
import shutil
import subprocess
import sys
import tomllib

from conftest import REPO

PACKAGE = REPO / "src" / "litmoe"
MAX_MODULE_LINES = 400


def lint_imports(root, config_dir) -> subprocess.CompletedProcess:
    """import-linter's command over the package found first on PYTHONPATH `root`, with the contracts of
    `config_dir`/pyproject.toml."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=config_dir, env=env, capture_output=True, text=True)


def test_the_import_contracts_are_kept():
    result = lint_imports(REPO / "src", REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_lazy_import_against_the_layers_or_a_cycle_breaks_a_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "src" / "litmoe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    back_edge = "\n\ndef probe():\n    from litmoe.training.fit import FitRun\n\n    return FitRun\n"
    with open(tmp_path / "src" / "litmoe" / "model" / "flops.py", "a") as file:
        file.write(back_edge)
    cycle = "\n\ndef probe():\n    from litmoe.training.fit import FitRun\n\n    return FitRun\n"
    with open(tmp_path / "src" / "litmoe" / "training" / "saving.py", "a") as file:
        file.write(cycle)
    result = lint_imports(tmp_path / "src", tmp_path)
    assert result.returncode != 0
    assert "litmoe.model.flops -> litmoe.training.fit" in result.stdout
    assert ".saving -> .fit" in result.stdout


def test_every_sub_package_has_its_layer():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract for contract in config if contract["type"] == "layers")["layers"]
    layered = {name.strip() for layer in layers for name in layer.split("|")}
    packages = {f"litmoe.{path.parent.name}" for path in PACKAGE.glob("*/__init__.py")}
    assert packages == layered
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py"]  # every module has a room


def test_every_module_reads_in_one_sitting():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES} == {}
