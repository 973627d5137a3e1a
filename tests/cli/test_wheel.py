"""From a wheel, outside the checkout: the zoo and the shipped recipes are part of the installed package,
so `fxcompress run NAME --check` (a shipped recipe found by name, its zoo model built, every step
compiled on digits) works in a fresh environment that cannot see the source tree; and this is the test
that starts the `fxcompress` console script as a real process (tests/cli/test_console.py starts
`python -m fxcompress`).

Kept cheap: the wheel (the `built_wheel` fixture, shared with tests/test_packaging.py) is built offline,
installed with --no-deps by this environment's pip run by the interpreter of a venv without pip (torch and
the other dependencies come from this environment through a .pth line), where fxcompress is imported from is
asked of the venv's interpreter without importing it (no torch), and `--check` compiles the recipe's steps
without training. Most of what is left is the script's imports (torch, torch.fx's symbolic shapes for the
file format's dry run).
"""
import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

RECIPES_LINE = '"fxcompress" = ["recipes/*.yaml"]'


def _venv(tmp_path: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel; this environment's site-packages (torch, numpy, ...) appended after its own."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # plain path lines: the editable install's own .pth hooks in this environment are not run there
    Path(purelib, "zz_outer_env.pth").write_text("\n".join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]))
    # This environment's pip run by the venv's interpreter: what `pip --python` does after starting pip here
    # first (a second pip start-up, about 0.6 s of CPU, saved). --no-compile: the modules a run imports are
    # byte-compiled as they load; pip's pass over every file is not needed.
    pip = importlib.util.find_spec("pip").submodule_search_locations[0]
    subprocess.run([python, pip, "install", "--no-deps", "--no-index", "--no-compile", "-q", str(wheel)], check=True,
                   capture_output=True)
    return venv


def test_the_installed_wheel_runs_a_shipped_recipe_on_a_zoo_model_outside_the_checkout(built_wheel, tmp_path):
    wheel = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxcompress/zoo.py" in names
    shipped = {n for n in names if n.startswith("fxcompress/recipes/") and n.endswith(".yaml")}
    assert "fxcompress/recipes/deep_compression_lenet300.yaml" in shipped, (
        f"the wheel holds no recipes: pyproject.toml needs {RECIPES_LINE} under [tool.setuptools.package-data]")
    venv = _venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    python, script = venv / "bin" / "python", venv / "bin" / "fxcompress"
    assert str(python) in "".join(script.read_text().splitlines(keepends=True)[:2])  # the script runs the venv's python
    # where the venv's interpreter imports fxcompress from, found without running it (a process without torch)
    where = subprocess.run([python, "-c", _WHERE], cwd=elsewhere, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(where) == 2 and all(Path(p).is_relative_to(venv) for p in where), where  # the installed copy
    assert Path(where[1], "zoo.py").is_file() and Path(where[1], "recipes").is_dir()
    # the wheel's console script itself, started as an executable: its first line names the venv's python
    run = subprocess.run([script, "run", "deep_compression_lenet300", "--check", "--quick"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "deep_compression_lenet300.yaml: valid; every step compiles on zoo:lenet300 with digits" in run.stdout
    assert list(elsewhere.iterdir()) == []  # --check writes nothing


def test_wheel_installs_passes_under_fxcompress_only(built_wheel):
    wheel = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "fxcompress/passes/__init__.py" in names
    assert not any(n.startswith("passes/") for n in names)
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["fxcompress"]
    sub_packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")}
    assert {"fxcompress", "fxcompress/passes", "fxcompress/analyses", "fxcompress/channels", "fxcompress/channels/graph",
            "fxcompress/fileformat", "fxcompress/encoded", "fxcompress/quant", "fxcompress/pruning"} <= sub_packages
    assert "fxcompress/zoo.py" in names  # the models demo and the shipped recipes build


_WHERE = """
import importlib.util
spec = importlib.util.find_spec("fxcompress")  # a top-level package is found, not run
print(spec.origin)
print(spec.submodule_search_locations[0])
"""
