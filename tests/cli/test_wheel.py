"""From a wheel, outside the checkout: the zoo and the shipped recipes are part of the installed package,
so `fxcompress run NAME --check` (a shipped recipe found by name, its zoo model built, every step
compiled on digits) works in a fresh environment that cannot see the source tree.

Kept to about 20 s on 2 cores: the wheel is built without build isolation from a copy of the sources,
installed with --no-deps into a venv without pip (torch and the other dependencies come from this
environment through a .pth line), and `--check` compiles the recipe's steps without training.
"""
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES_LINE = '"fxcompress" = ["recipes/*.yaml"]'


def _wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"  # a copy: setuptools' build/ folder in a checkout keeps files that moved away
    for part in ("fxcompress", "passes"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fxcompress-*.whl")
    return wheel


def _venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel; this environment's site-packages (torch, numpy, ...) appended after its own."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # plain path lines: the editable install's own .pth hooks in this environment are not run there
    Path(purelib, "zz_outer_env.pth").write_text("\n".join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True)
    return venv


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools builds the wheel offline")
def test_the_installed_wheel_runs_a_shipped_recipe_on_a_zoo_model_outside_the_checkout(tmp_path):
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxcompress/zoo.py" in names
    shipped = {n for n in names if n.startswith("fxcompress/recipes/") and n.endswith(".yaml")}
    assert "fxcompress/recipes/deep_compression_lenet300.yaml" in shipped, (
        f"the wheel holds no recipes: pyproject.toml needs {RECIPES_LINE} under [tool.setuptools.package-data]")
    venv = _venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = subprocess.run([venv / "bin" / "python", "-c", "import fxcompress, fxcompress.zoo; "
                            "print(fxcompress.__file__); print(fxcompress.zoo.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # the installed copy, not the checkout
    run = subprocess.run([venv / "bin" / "fxcompress", "run", "deep_compression_lenet300", "--check", "--quick"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "deep_compression_lenet300.yaml: valid; every step compiles on zoo:lenet300 with digits" in run.stdout
    assert list(elsewhere.iterdir()) == []  # --check writes nothing
