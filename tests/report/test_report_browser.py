"""The report in a real browser: Debian's chromium, headless, renders the page with its pictures and
its graph (skipped only where chromium is absent)."""
import shutil
import subprocess

import numpy as np
import pytest


BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
ORANGE = np.array([0xF5, 0x85, 0x18])  # the sparsity bars (figures.ORANGE)
CREATED = np.array([0x5F, 0xA8, 0xD3])  # graph boxes a pass created (draw.STATUS_COLOURS)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")


def _browser(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def _pixels_near(image: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(image[..., :3].astype(int) - colour).max(axis=-1) <= 6).sum())


def test_the_report_renders_its_pictures_and_graph_in_chromium(report_page, tmp_path):
    image_module = pytest.importorskip("matplotlib.image")
    page = report_page.html  # the encoded model's report with its five pictures (the conftest writes it once)
    shot = tmp_path / "report.png"
    # one browser run both dumps the rendered DOM to stdout and writes the screenshot (each start costs seconds)
    run = _browser(tmp_path, "--dump-dom", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert run.stdout.count('<img alt=') == 5 and run.stdout.count('src="data:image/png;base64,') == 5
    assert 'class="fxgraph"' in run.stdout and run.stdout.count("marker-end=") > 10  # the graph, with arrows
    image = image_module.imread(shot)
    image = (image * 255).round().astype(np.uint8) if image.dtype != np.uint8 else image
    assert image.shape[:2] == (2000, 1280)
    assert image[..., :3].std() > 20  # not blank
    assert _pixels_near(image, ORANGE) > 500  # the bars picture was decoded and drawn


def test_the_graph_view_renders_in_chromium(compressed, tmp_path):
    image_module = pytest.importorskip("matplotlib.image")
    import fxcompress
    _, fake_quant, _, _ = compressed
    svg = fxcompress.draw(fake_quant, tmp_path / "graph.svg")
    shot = tmp_path / "graph.png"
    run = _browser(tmp_path, f"--screenshot={shot}", "--window-size=1000,900", svg.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = image_module.imread(shot)
    image = (image * 255).round().astype(np.uint8) if image.dtype != np.uint8 else image
    assert _pixels_near(image, CREATED) > 2000  # the layer boxes InsertMasks created, drawn in blue
