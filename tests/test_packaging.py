import subprocess
import sys
import zipfile
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
