"""The installed entry points as real processes: the `fxcompress` console script and `python -m fxcompress`."""
import subprocess
import sys
from pathlib import Path

import fxcompress

SCRIPT = Path(sys.executable).parent / "fxcompress"  # installed beside the interpreter by `pip install -e .`


def test_console_script_inspects_a_file(encoded_file):
    path, _, _ = encoded_file
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: reinstall the package (pip install -e .)"
    done = subprocess.run([str(SCRIPT), "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    total = fxcompress.summary(fxcompress.load(path)).totals["compressed_bytes"]
    assert "per-layer bytes:" in done.stdout and str(total) in done.stdout


def test_python_m_reports_a_bad_recipe_line_and_exits_non_zero(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: zoo:lenet300\ndata: digits\nsteps:\n  - pass: InsertMasks\n    config: {bits: 4}\n")
    done = subprocess.run([sys.executable, "-m", "fxcompress", "run", str(recipe)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("fxcompress: error: bad.yaml:5: unknown key steps[0].config.bits; InsertMasks "
                                  "takes sparsity, ")
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n")
