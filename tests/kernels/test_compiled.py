import ctypes
import shutil

import pytest

from fxcompress.errors import ConfigError
from fxcompress.kernels import compiled

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler on this machine")


@pytest.fixture
def sources(tmp_path, monkeypatch):
    folder = tmp_path / "csrc"
    folder.mkdir()
    monkeypatch.setattr(compiled, "SOURCES", folder)
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FXCOMPRESS_NO_C", raising=False)
    compiled.library.cache_clear()
    yield folder
    compiled.library.cache_clear()


@needs_compiler
def test_builds_once_and_loads_the_cached_library(sources, tmp_path):
    (sources / "adder.c").write_text("int add(int a, int b) { return a + b; }\n")
    lib = compiled.library("adder")
    lib.add.restype, lib.add.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    assert lib.add(2, 40) == 42
    (built,) = (tmp_path / "cache").glob("adder-*.so")
    stamp = built.stat().st_mtime_ns
    compiled.library.cache_clear()
    assert compiled.library("adder") is not None
    assert built.stat().st_mtime_ns == stamp            # the cached build was reused, not rebuilt
    (sources / "adder.c").write_text("int add(int a, int b) { return a + b + 1; }\n")
    compiled.library.cache_clear()
    compiled.library("adder")
    assert len(list((tmp_path / "cache").glob("adder-*.so"))) == 2   # a changed source gets its own build


@needs_compiler
def test_a_source_that_does_not_compile_warns_and_gives_none(sources):
    (sources / "broken.c").write_text("int add(int a, { return; }\n")
    with pytest.warns(UserWarning, match="broken"):
        assert compiled.library("broken") is None


def test_no_compiler_or_switched_off_gives_none(sources, monkeypatch):
    (sources / "adder.c").write_text("int add(int a, int b) { return a + b; }\n")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert compiled.library("adder") is None
    compiled.library.cache_clear()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("FXCOMPRESS_NO_C", "1")
    assert compiled.library("adder") is None


def test_an_unknown_kernel_is_a_config_error(sources):
    with pytest.raises(ConfigError, match="no-such"):
        compiled.library("no-such")
