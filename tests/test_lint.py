"""ruff (its settings in pyproject.toml): pyflakes' unused imports and undefined names, pycodestyle's
errors (lines of at most 120 characters), the import order. Fast: part of the edit loop's tier."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def ruff():
    beside = Path(sys.executable).with_name("ruff")  # the environment's own, as requirements.txt pins it
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -r requirements.txt")
    return found


def test_ruff_finds_nothing():
    proc = subprocess.run([ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_would_catch_an_unused_import_and_an_undefined_name(tmp_path):
    """The check can fail: the same settings find both faults in a file that has them."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    proc = subprocess.run([ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "F401" in proc.stdout and "F821" in proc.stdout, proc.stdout
