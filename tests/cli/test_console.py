"""The installed entry points as real processes: the `fxcompress` console script and `python -m fxcompress`."""
import os
import subprocess
import sys
from pathlib import Path

import fxcompress

SCRIPT = Path(sys.executable).parent / "fxcompress"  # installed beside the interpreter by `pip install -e .`


def test_console_script_inspects_a_file(encoded_file):
    """... and, loading it, never imports torch._dynamo (load's dry run computes the common ops from tables),
    nor networkx or scipy (imported where a channel graph, a drawing or a scipy kernel needs them): Python's
    import log (PYTHONPROFILEIMPORTTIME) names every module the command imported."""
    path, _, _ = encoded_file
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: reinstall the package (pip install -e .)"
    done = subprocess.run([str(SCRIPT), "inspect", str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "fxcompress.fileformat.dryrun" in imported and "torch._dynamo" not in imported
    assert "fxcompress.channels.graph.dependencies" in imported and not {"networkx", "scipy"} & set(imported)
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
