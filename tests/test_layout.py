"""The package's shape: subpackages by concern, each importing only the layers below it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import xcit

ROOT = Path(xcit.__file__).parent
LAYERS = ("runtime", "model", "fast", "config", "weights", "data", "train", "infer", "bench", "cli")


def test_the_package_root_holds_only_subpackages():
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert modules == ["__init__.py"]
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)


def test_layers_contract_holds():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    out = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 kept, 0 broken" in out.stdout
