import subprocess
import sys
from pathlib import Path


import fxcompress
import fxcompress.passes

ROOT = Path(__file__).resolve().parents[1]


def test_passes_subpackage_is_the_top_level_passes_folder():
    assert Path(fxcompress.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"
    assert Path(fxcompress.__file__).resolve() == ROOT / "fxcompress" / "__init__.py"


def test_no_top_level_passes_module_outside_the_repository(tmp_path):
    code = "import importlib.util, sys; print(importlib.util.find_spec('passes') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# The wheel's contents (passes under fxcompress only) are checked in tests/cli/test_wheel.py beside its install:
# a module's tests share a worker, so the session-scoped built_wheel is built there once, not once in each file's worker.
