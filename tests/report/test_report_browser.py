"""The report in a real browser: Debian's chromium, headless, renders the page with its pictures and
its graph, and draw()'s standalone SVG file beside it, in one run (skipped only where chromium is absent)."""
import shutil
import subprocess

import numpy as np
import pytest


BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
ORANGE = np.array([0xF5, 0x85, 0x18])  # the sparsity bars (figures.ORANGE)
CREATED = np.array([0x5F, 0xA8, 0xD3])  # graph boxes a pass created (draw.STATUS_COLOURS)
REPORT_WIDTH = 1280  # the report's window width

pytestmark = pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")


def _browser(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def _pixels_near(image: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(image[..., :3].astype(int) - colour).max(axis=-1) <= 6).sum())


def test_the_report_and_the_graph_view_render_in_chromium(report_page, compressed, tmp_path):
    """One browser run (each start costs seconds) renders the encoded model's report with its five pictures
    and its graph (the conftest writes it once), and beside it draw()'s standalone SVG file of the fake-quant
    model, loaded as an image: the file parsed as an XML document of its own, as when it is opened."""
    image_module = pytest.importorskip("matplotlib.image")
    import fxcompress
    svg = fxcompress.draw(compressed[1], tmp_path / "graph.svg")
    # the page as written, in a copy beside the SVG: laid out 1280 px wide as in a 1280 px window, the
    # SVG to its right
    page = tmp_path / "report.html"
    page.write_text(report_page.html.read_text().replace(
        "</body>", f'<style>html {{ width: {REPORT_WIDTH}px; }}</style><img id="graph-file" src="{svg.name}" '
                   f'style="position: absolute; left: {REPORT_WIDTH}px; top: 0; margin: 0; max-width: none">\n</body>'))
    shot = tmp_path / "report.png"
    # one browser run both dumps the rendered DOM to stdout and writes the screenshot
    run = _browser(tmp_path, "--dump-dom", f"--screenshot={shot}", f"--window-size={REPORT_WIDTH + 1000},2000",
                   page.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert run.stdout.count('<img alt=') == 5 and run.stdout.count('src="data:image/png;base64,') == 5
    assert 'class="fxgraph"' in run.stdout and run.stdout.count("marker-end=") > 10  # the graph, with arrows
    assert 'id="graph-file"' in run.stdout
    image = image_module.imread(shot)
    image = (image * 255).round().astype(np.uint8) if image.dtype != np.uint8 else image
    assert image.shape[:2] == (2000, REPORT_WIDTH + 1000)
    report, graph = image[:, :REPORT_WIDTH], image[:900, REPORT_WIDTH:]
    assert report[..., :3].std() > 20  # not blank
    assert _pixels_near(report, ORANGE) > 500  # the bars picture was decoded and drawn
    assert _pixels_near(graph, CREATED) > 2000  # the layer boxes InsertMasks created, drawn in blue
