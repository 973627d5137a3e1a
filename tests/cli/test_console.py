"""The installed entry points: `python -m fxcompress` as a real process here, the `fxcompress` console script as
a real process from an installed wheel in tests/cli/test_wheel.py (each fresh process costs an interpreter, a
torch import and fxcompress's own, about 4 s of CPU here; the other checks of an entry point run in this one)."""
import gc
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import fxcompress
from fxcompress.cli import main

SCRIPT = Path(sys.executable).parent / "fxcompress"  # installed beside the interpreter by `pip install -e .`


def test_python_m_inspects_a_file(encoded_file):
    """... and, loading it, never imports torch._dynamo (load's dry run computes the common ops from tables),
    nor networkx or scipy (imported where a channel graph, a drawing or a scipy kernel needs them): Python's
    import log (PYTHONPROFILEIMPORTTIME) names every module the command imported."""
    path, _, _ = encoded_file
    done = subprocess.run([sys.executable, "-m", "fxcompress", "inspect", str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "fxcompress.fileformat.dryrun" in imported and "torch._dynamo" not in imported
    assert "fxcompress.channels.graph.dependencies" in imported and not {"networkx", "scipy"} & set(imported)
    total = fxcompress.summary(fxcompress.load(path)).totals["compressed_bytes"]
    assert "per-layer bytes:" in done.stdout and str(total) in done.stdout


def test_the_console_script_beside_the_interpreter_calls_main():
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: reinstall the package (pip install -e .)"
    text = SCRIPT.read_text()
    assert text.startswith("#!") and "from fxcompress.cli import main" in text


def test_python_m_reports_a_bad_recipe_line_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """fxcompress/__main__.py run as `python -m` runs it (runpy, __name__ "__main__"), in this process: its exit
    status is the SystemExit code the interpreter would exit with (the real process is the test above). As the
    process's command line it freezes the collector's view of the heap once: recorded here, not done to the
    test process's heap."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: zoo:lenet300\ndata: digits\nsteps:\n  - pass: InsertMasks\n    config: {bits: 4}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fxcompress", "run", str(recipe)])
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as done:
        runpy.run_module("fxcompress", run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    assert done.value.code == 1 and out == "" and frozen == [True]
    assert err.startswith("fxcompress: error: bad.yaml:5: unknown key steps[0].config.bits; InsertMasks "
                          "takes sparsity, ")
    assert err.count("\n") == 1 and err.endswith("\n")


def test_a_caller_passing_argv_keeps_its_collector(monkeypatch, capsys):
    monkeypatch.setattr(gc, "freeze", lambda: pytest.fail("main(argv) froze the caller's heap"))
    assert main(["--help"]) == 0 and "inspect" in capsys.readouterr().out
