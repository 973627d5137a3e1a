"""write_report: the HTML page and its Markdown, the weights before / after quantization, the pictures,
the tables-only page without matplotlib, and the page in a real browser: Debian's chromium, headless,
renders it with its pictures and graph, and draw()'s standalone SVG file beside it, in one run (skipped
only where chromium is absent). One module, so the page the package fixture writes is written once."""
import base64
import io
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.layers import find_layers
from fxcompress.report import layer_weights, write_report

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def test_weights_before_quantization_come_from_the_chain_or_the_reference(compressed):
    dense, fake_quant, encoded, _ = compressed
    from_chain = {w.name: w for w in layer_weights(fake_quant)}
    for layer in find_layers(fake_quant):
        masked = dense.get_submodule(layer.name).weight * fake_quant.get_submodule(layer.name).weight_mask
        weights = from_chain[layer.name]
        assert torch.equal(weights.before, masked)  # the quantizer's input: the pruned float weight
        assert torch.equal(weights.centroids, torch.unique(weights.after[weights.after != 0]))
        assert 1 < weights.centroids.numel() <= 16  # 4-bit k-means
        assert (weights.after[weights.before == 0] == 0).all()
    assert all(w.before is None for w in layer_weights(encoded))  # encoded: the float weights are gone
    referenced = {w.name: w for w in layer_weights(encoded, reference=fake_quant)}
    assert all(torch.equal(referenced[n].before, w.before) and torch.equal(referenced[n].after, w.after)
               for n, w in from_chain.items())
    plain = {w.name: w for w in layer_weights(encoded, reference=dense)}  # a plain module: its weights
    assert torch.equal(plain["fc1"].before, dense.fc1.weight)


def test_a_reference_that_does_not_fit_is_refused(compressed):
    _, _, encoded, _ = compressed
    from fxcompress.zoo import LeNet300100
    with pytest.raises(ConfigError, match="layer fc1 has weight shape"):
        layer_weights(encoded, reference=LeNet300100(in_features=784))
    with pytest.raises(ConfigError, match="report.reference"):
        layer_weights(encoded, reference="fake_quant.fxc")


def test_html_page_holds_tables_pictures_and_graph(compressed, table, report_page):
    _, _, encoded, x = compressed
    files = report_page  # write_report(encoded, .../r.html, reference=fake_quant, sensitivity=table, ...)
    page = files.html.read_text()
    pictures = PNG.findall(page)
    assert files.pictures == len(pictures) == 1 + 3 + 1  # bars, a histogram per layer, the sensitivity curves
    for data in pictures:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = fxcompress.summary(encoded, (x[:1],))
    assert f"<b>{summary.totals['ratio']:.2f}x</b>" in page and "LeNet &lt;test&gt;" in page
    for record in fxcompress.history(encoded):
        assert f'<td class="text">{record.name}</td>' in page
    assert page.count('<g class="node">') >= len([n for n in encoded.graph.nodes if n.op != "get_attr"]) - 3
    assert not re.search(r'(src|href)="(https?:)?//|<link|@import|url\(http', page)  # nothing is fetched
    assert "pass a reference model" not in page  # the reference held the weights before quantization
    text = files.markdown.read_text()
    assert files.markdown == files.html.with_name("r.md") and summary.to_markdown() in text
    assert table.to_markdown() in text and "LowerToEncoded" in text


def test_without_matplotlib_the_page_keeps_its_tables_and_graph(compressed, table, tmp_path, monkeypatch):
    _, _, encoded, _ = compressed
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    files = write_report(encoded, tmp_path / "r.html", sensitivity=table)
    page = files.html.read_text()
    assert files.pictures == 0 and not PNG.search(page)
    assert "matplotlib is not installed" in page and "<svg" in page and "compressed_bytes" in page
    assert "<td>fc1</td>" in page and "Pruning sensitivity" in page


def test_markdown_only_and_bad_arguments(compressed, tmp_path):
    _, fake_quant, _, _ = compressed
    files = write_report(fake_quant, tmp_path / "only.md")
    assert files.html is None and files.pictures == 0 and "InsertFakeQuant" in files.markdown.read_text()
    assert not (tmp_path / "only.html").exists()
    with pytest.raises(ConfigError, match="report.path"):
        write_report(fake_quant, tmp_path / "r.pdf")
    with pytest.raises(ConfigError, match="report.gm"):
        write_report(torch.nn.Linear(2, 2), tmp_path / "r.html")
    with pytest.raises(ConfigError, match="report.sensitivity"):
        write_report(fake_quant, tmp_path / "r.html", sensitivity={"fc1": 0.5})
    with pytest.raises(ConfigError, match="report.max_histograms"):
        write_report(fake_quant, tmp_path / "r.html", max_histograms=-1)


def test_write_report_is_exported_at_the_top_level():
    assert fxcompress.write_report is write_report and "write_report" in fxcompress.__all__
    assert "write_report(gm, path" in fxcompress.__doc__  # documented where users look first


def test_a_fully_pruned_layer_and_a_layer_not_on_a_codebook_are_drawn():
    image = pytest.importorskip("matplotlib.image")
    from fxcompress.report.collect import LayerWeights
    from fxcompress.report.figures import GREY, RED, histogram
    zeros = torch.zeros(4, 3)
    png = base64.b64decode(histogram(LayerWeights("fc", zeros, zeros, None)).split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"  # drawn, with a note, rather than failing on no weights
    # plain float weights (a channel-pruned conv): nothing before them, no marks, grey histograms both sides
    plain = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    pixels = image.imread(io.BytesIO(base64.b64decode(histogram(LayerWeights("conv", plain, None, None)).split(",", 1)[1])))
    rgb = (pixels[..., :3] * 255).round().astype(int)
    grey, red = (np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)]) for c in (GREY, RED))
    half = rgb.shape[1] // 2
    assert min(_pixels_near(rgb[:, :half], grey), _pixels_near(rgb[:, half:], grey)) > 2000
    assert _pixels_near(rgb, red) == 0


def _as_matplotlib_draws(monkeypatch):
    """figures as matplotlib alone draws: a new figure each picture (the kept ones set aside), its
    titles placed by matplotlib."""
    from fxcompress.report import figures
    monkeypatch.setattr(figures, "_SPARE", threading.local())
    monkeypatch.setattr(figures, "_spare_figure", lambda kind, figsize, ncols=2, **subplots:
                        figures._agg_figure(figsize, ncols, **subplots))
    monkeypatch.setattr(figures, "_pin_titles", lambda fig: False)


def test_histograms_on_the_kept_figure_are_pixel_for_pixel_those_of_a_new_figure(compressed, monkeypatch):
    """Histograms are drawn on one kept figure, emptied each time, with their titles pinned at the top of
    the axes instead of matplotlib measuring every tick label to place them (but over an offset text,
    "1e6", drawn again on a new figure, where matplotlib places them): the pictures must not change, after
    a layer of centroids, a fully pruned one and one whose counts need an offset text, and the layer of
    centroids again after it (its titles pinned once more)."""
    image = pytest.importorskip("matplotlib.image")
    from fxcompress.report import figures
    from fxcompress.report.collect import LayerWeights
    zeros = torch.zeros(4, 3)
    many = torch.full((1_200_000,), 0.5)  # 1.2 million weights on one centroid: the count axes read "1e6"
    layers = [layer_weights(compressed[1])[0], LayerWeights("fc", zeros, zeros, None),
              LayerWeights("big", many, many, torch.tensor([0.5]))]
    layers.append(layers[0])
    def pixels(uri):
        return image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    kept = [pixels(figures.histogram(w)) for w in layers]
    _as_matplotlib_draws(monkeypatch)
    for weights, picture in zip(layers, kept):
        assert (pixels(figures.histogram(weights)) == picture).all(), weights.name


def test_bars_and_curves_on_the_kept_figures_are_those_of_new_figures_byte_for_byte(monkeypatch):
    """The bars and the sensitivity curves are drawn on kept figures too, resized and emptied each time
    (bar containers, legend, log scale, colour cycle): drawn after a picture of other data, the PNG is the
    one matplotlib alone writes on a new figure, to the byte."""
    pytest.importorskip("matplotlib")
    from fxcompress.report import figures
    from fxcompress.sensitivity import SensitivityTable
    bars = [[{"layer": f"block{i}.attention.output_projection", "dense_bytes": 4000 * (i + 1),
              "compressed_bytes": 300 * (i + 1), "sparsity": None if i == 2 else i / 8} for i in range(n)]
            for n in (5, 3)]  # two heights (from 5 rows on, the picture grows)
    curves = [SensitivityTable(tuple("abcd"[:n]), (0.2, 0.6), ((0.9, 0.5), (0.8, 0.7), (0.9, 0.9), (1, 0))[:n], 0.95,
                               "channel", "accuracy") for n in (4, 2)]  # the second starts the colour cycle again
    kept = [[draw(first), draw(second)] for draw, (first, second) in
            ((figures.bytes_and_sparsity, bars), (figures.sensitivity_curves, curves))]
    _as_matplotlib_draws(monkeypatch)
    assert figures.bytes_and_sparsity(bars[1]) == kept[0][1] != kept[0][0]
    assert figures.sensitivity_curves(curves[1]) == kept[1][1] != kept[1][0]


def test_a_histogram_without_the_bezier_walk_has_matplotlibs_own_limits():
    """figures._hist takes the stepfilled polygon's data limits from its vertices instead of matplotlib's
    walk over its edges: the limits, the view and the polygon are those of ax.hist itself."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from fxcompress.report import figures
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0)).numpy() * 3 + 1
    ours, theirs = Figure().subplots(1, 2)
    figures._hist(ours, values, bins=120, color=figures.BLUE)
    theirs.hist(values, bins=120, color=figures.BLUE, histtype="stepfilled")
    assert "_update_patch_limits" not in vars(ours)  # the walk is back for the axes' next patch
    assert ours.dataLim.bounds == theirs.dataLim.bounds and ours.viewLim.bounds == theirs.viewLim.bounds
    assert (ours.patches[0].get_xy() == theirs.patches[0].get_xy()).all()


def test_a_title_over_an_offset_text_is_left_for_matplotlib_to_place():
    pytest.importorskip("matplotlib")
    from fxcompress.report import figures
    plt = figures._pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1e7, 3e7])
    ax.set_title("a title as wide as the axes, over the offset text at their top left corner", fontsize=10)
    assert not figures._pin_titles(fig)
    fig.canvas.draw()
    assert ax.yaxis.offsetText.get_text() and ax.title.get_position()[1] > 1.0  # moved above the offset text
    plt.close(fig)


# The page in a real browser

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
ORANGE_RGB = np.array([0xF5, 0x85, 0x18])  # the sparsity bars (figures.ORANGE)
CREATED = np.array([0x5F, 0xA8, 0xD3])  # graph boxes a pass created (draw.STATUS_COLOURS)
REPORT_WIDTH = 1280  # the report's window width


def _browser(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def _pixels_near(image: np.ndarray, colour: np.ndarray) -> int:
    return int((np.abs(image[..., :3].astype(int) - colour).max(axis=-1) <= 6).sum())


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")
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
    assert _pixels_near(report, ORANGE_RGB) > 500  # the bars picture was decoded and drawn
    assert _pixels_near(graph, CREATED) > 2000  # the layer boxes InsertMasks created, drawn in blue


def test_distinct_float_weights_are_not_marked_as_centroids():
    """A heavily pruned float layer has few distinct values, one weight each: they were marked as its
    "centroids" whenever there were at most 256 of them."""
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    passes = [InsertMasks(sparsity=0.9), InsertFakeQuant(method="kmeans", bits=3, select="2")]
    gm = fxcompress.compile(model, passes, example_inputs=(torch.randn(2, 64),))
    weights = {w.name: w for w in layer_weights(gm)}
    plain, shared = weights["0"], weights["2"]
    assert 0 < int(torch.count_nonzero(plain.after)) <= 256 and plain.centroids is None and plain.marks == ""
    values = torch.unique(shared.after[shared.after != 0])
    assert torch.equal(shared.centroids, values) and shared.marks == f"{len(values)} centroids" and len(values) <= 7


def test_a_misspelt_option_is_a_config_error_naming_it(compressed, tmp_path):
    _, fake_quant, _, _ = compressed
    with pytest.raises(ConfigError, match="unknown option 'refrence'"):
        write_report(fake_quant, tmp_path / "r.html", refrence=fake_quant)
    assert not (tmp_path / "r.html").exists()


def test_a_loaded_files_pass_times_are_not_shown_as_zero(compressed, tmp_path):
    from html.parser import HTMLParser
    _, fake_quant, _, _ = compressed
    fxcompress.save(fake_quant, tmp_path / "m.fxc")  # deterministic: the file holds no times
    page = write_report(fxcompress.load(tmp_path / "m.fxc"), tmp_path / "r.html", draw_graph=False).html.read_text()
    HTMLParser().feed(page)
    history = page.split("<h2>Passes</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<td>0.000</td>" not in history and "<td>-</td>" in history
