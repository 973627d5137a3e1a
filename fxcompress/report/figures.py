"""The report's pictures as inline PNG data (base64), drawn with matplotlib, an optional extra.

`available()` says whether matplotlib can be imported; without it the report keeps its tables and
the graph (which draw.py writes as SVG itself). Each kind of picture is drawn on one kept figure per
thread (outside pyplot, on its own Agg canvas), emptied back to a new figure's state for the next
picture: the PNGs are byte for byte those of a new figure.
"""
from __future__ import annotations

import base64
import io
import threading
from collections.abc import Sequence

import torch

from ..sensitivity import SensitivityTable
from .collect import LayerWeights

BLUE, ORANGE, RED, GREY = "#4c78a8", "#f58518", "#d62728", "#9d9d9d"
MAX_LINES = 64  # more centroids or levels than this are marked by ticks along the axis, not lines
_SPARE = threading.local()  # each thread's kept figures by kind ("bars", "histogram", "sensitivity")


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def available() -> bool:
    return _pyplot() is not None


def _pin_titles(fig) -> bool:
    """Put each title where matplotlib's placement would: at the top of its axes, unless the y axis shows
    an offset text ("1e6") there, which the title must clear. matplotlib finds this out on every draw by
    measuring every tick label (a fifth of a picture's time); the offset is known without drawing.
    True when every title was pinned."""
    pinned = True
    for ax in fig.axes:
        if not ax.get_title():
            continue
        formatter = ax.yaxis.get_major_formatter()
        formatter.set_locs(ax.yaxis.get_majorticklocs())  # the locations the draw will format, limits final
        if not formatter.get_offset():  # pinned: matplotlib no longer moves it
            ax.set_title(ax.get_title(), y=1.0, fontsize=ax.title.get_fontsize())
        else:
            pinned = False
    return pinned


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _agg_figure(figsize, ncols: int, **subplots):
    """A new figure of `ncols` panels in a row, outside pyplot, on its own Agg canvas. savefig draws a
    figure without one on a new canvas each time, whose new renderer measures every text and parses every
    mathtext label ("$10^{3}$") again; a kept canvas keeps its renderer, and the renderer its caches,
    while the size holds."""
    _pyplot()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    fig.subplots(1, ncols, **subplots)
    return fig


def _empty(fig) -> None:
    """Every axes back to a new one's state: no artists, containers (the legend's handles) or legend, no
    data limits, a new axes' unit view autoscaled (a linear one: a log axis is set log again by its
    picture), no title or labels, the colour cycle at its start."""
    for ax in fig.axes:
        for container in list(ax.containers):
            container.remove()
        for artist in (*ax.lines, *ax.patches, *ax.collections, *ax.texts):
            artist.remove()
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        if ax.get_xscale() != "linear":
            ax.set_xscale("linear")
        ax.relim()
        ax.set(xlim=(0, 1), ylim=(0, 1), title="", xlabel="", ylabel="")
        ax.set_autoscale_on(True)
        ax.set_prop_cycle(None)


def _spare_figure(kind: str, figsize, ncols: int = 2, **subplots):
    """This thread's kept figure of a kind, emptied, or a new one. A new figure makes every tick of its
    axes again on its first draw (a third of a histogram's time, half the bars' with their log axis'
    minor ticks); an emptied one draws with the ticks it has. Outside pyplot, so a user's plt.show()
    never sees it."""
    fig = getattr(_SPARE, kind, None)
    if fig is None:
        fig = _agg_figure(figsize, ncols, **subplots)
        setattr(_SPARE, kind, fig)
        return fig
    if tuple(fig.get_size_inches()) != tuple(figsize):
        fig.set_size_inches(figsize)
    _empty(fig)
    return fig


def _kept_png(kind: str, draw, *args) -> str:
    """The figure `draw(*args)` returns, drawn on the kept figure of `kind` (`_spare_figure`), as a
    data: URI. Titles are pinned at the top of their axes; a picture whose y axis shows an offset text
    is drawn again on a new figure, where matplotlib's own placement of its titles holds (an axes that
    held a pinned title keeps it pinned, and matplotlib has no public way to hand it back)."""
    reused = getattr(_SPARE, kind, None) is not None
    fig = draw(*args)
    if not _pin_titles(fig):
        setattr(_SPARE, kind, None)
        if reused:
            return _kept_png(kind, draw, *args)
    return _png(fig)


def bytes_and_sparsity(rows: Sequence[dict]) -> str:
    """Per layer: dense vs compressed bytes (log scale) and weight sparsity, side by side."""
    return _kept_png("bars", _draw_bars, [r for r in rows if r.get("dense_bytes")])


def _draw_bars(rows: list[dict]):
    names = [str(r["layer"]) for r in rows]
    height = max(2.6, 0.32 * len(rows) + 1.2)
    fig = _spare_figure("bars", (11, height), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    left, right = fig.axes
    where = torch.arange(len(rows)).numpy()
    left.barh(where - 0.2, [r["dense_bytes"] for r in rows], height=0.4, color=GREY, label="dense fp32")
    left.barh(where + 0.2, [r["compressed_bytes"] for r in rows], height=0.4, color=BLUE, label="compressed")
    left.set(xscale="log", xlabel="bytes (log scale)", title="Bytes per layer")
    left.set_yticks(where, names, fontsize=9)
    left.invert_yaxis()
    left.legend(fontsize=9, loc="lower right")
    right.barh(where, [100 * (r.get("sparsity") or 0) for r in rows], color=ORANGE)
    right.set(xlim=(0, 100), xlabel="weights pruned (%)", title="Sparsity per layer")
    for y, r in zip(where, rows):
        if r.get("sparsity") is not None:
            right.text(min(100 * r["sparsity"] + 1, 88), y, f"{100 * r['sparsity']:.1f}%", va="center", fontsize=8)
    # fixed margins (tight_layout draws every figure twice): room on the left for the longest name
    fig.subplots_adjust(left=min(0.4, 0.03 + 0.0075 * max(map(len, names), default=0)), right=0.98,
                        bottom=0.9 / height, top=1 - 0.45 / height, wspace=0.08)
    return fig


def _mark(ax, weights: LayerWeights) -> None:
    """The centroids or grid levels on the left panel: a line each up to MAX_LINES, ticks along the axis."""
    values = weights.centroids.numpy()
    if len(values) <= MAX_LINES:  # one collection of lines, the axes' height each: a Line2D each cost more
        ax.vlines(values, 0, 1, transform=ax.get_xaxis_transform(), color=RED, linewidth=0.6, alpha=0.35)
    ax.plot(values, [0] * len(values), "^" if len(values) <= MAX_LINES else "|", color=RED,
            markersize=6, clip_on=False)


def _hist(ax, values, **options) -> None:
    """ax.hist(values, histtype="stepfilled"), its polygon's data limits taken from its vertices. matplotlib
    finds them by walking each of the polygon's hundreds of edges as a Bezier curve (a tenth of a
    histogram's time): the edges are straight, so the vertices are the same points and give the same
    limits. The walk is switched off on this axes only, for this call; should matplotlib name it
    otherwise, it runs, and the limits are still those of the same points."""
    ax._update_patch_limits = lambda patch: None
    try:
        _, _, patches = ax.hist(values, histtype="stepfilled", **options)
    finally:
        del ax._update_patch_limits
    for patch in patches:
        ax.update_datalim(patch.get_path().vertices)


def _per_level(ax, weights: LayerWeights) -> None:
    """The right panel: how many weights each centroid or grid level took."""
    after = weights.after.flatten().float()
    if not after.count_nonzero():
        ax.text(0.5, 0.5, "every weight is zero (pruned)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("after quantization", fontsize=10)
        return
    if weights.grid is not None:  # counted over every channel / group, by level (code - zero-point)
        grid = weights.grid
        centred = (grid.codes.float() - grid.zero_point.repeat_interleave(grid.group_size, dim=1)).flatten()
        values, counts = torch.unique(centred[centred != 0], return_counts=True)
        title = f"after: weights per grid level, all {'groups' if grid.scale.shape[1] > 1 else 'channels'}"
        label = "level (code - zero-point)"
    elif weights.centroids is not None or weights.codes_only:
        values, counts = torch.unique(after[after != 0], return_counts=True)
        title, label = (("after: weights per integer code", "code")
                        if weights.codes_only else ("after quantization: weights per centroid", "centroid value"))
    else:
        _hist(ax, after[after != 0].numpy(), bins=120, color=GREY)
        ax.set_title("after (not on a codebook)", fontsize=10)
        ax.set(xlabel="weight value", ylabel="count")
        return
    ax.vlines(values.numpy(), 0, counts.numpy(), color=RED, linewidth=2 if len(values) <= 64 else 1)
    if len(values) <= 64:
        ax.plot(values.numpy(), counts.numpy(), "o", color=RED, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=label, ylabel="count")


def histogram(weights: LayerWeights) -> str:
    """Deep Compression's picture of a layer: the weights before quantization (zeros left out) with
    the centroids or grid levels marked, and how many weights each centroid or level took after."""
    return _kept_png("histogram", _draw_histogram, weights)


def _draw_histogram(weights: LayerWeights):
    fig = _spare_figure("histogram", (11, 3.0))
    left, right = fig.axes
    after = weights.after.flatten().float()
    before = weights.before.flatten().float() if weights.before is not None else None
    shown = before[before != 0] if before is not None else after[after != 0]
    codes = before is None and weights.codes_only  # integer codes: one bin per code
    bins = torch.arange(shown.min() - 0.5, shown.max() + 1.5).numpy() if codes and len(shown) else 120
    if len(shown):
        _hist(left, shown.numpy(), bins=bins, color=BLUE if before is not None else GREY)
    else:
        left.text(0.5, 0.5, "every weight is zero (pruned)", ha="center", va="center", transform=left.transAxes)
    title = ("integer codes after quantization" if codes else
             f"{'before' if before is not None else 'after'} quantization (nonzero weights)")
    # what is marked goes in the title's second line: a legend inside the axes covers the weights
    marked = f"\nin red: {weights.marks}" if weights.centroids is not None else ""
    left.set_title(f"{weights.name}: {title}{marked}", fontsize=10)
    left.set(xlabel="integer code" if codes else "weight value", ylabel="count")
    if weights.centroids is not None:
        _mark(left, weights)
    _per_level(right, weights)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.16, top=0.83, wspace=0.2)
    return fig


def sensitivity_curves(table: SensitivityTable) -> str:
    """The sensitivity table's curves: each layer's metric against its sparsity."""
    return _kept_png("sensitivity", _draw_sensitivity, table)


def _draw_sensitivity(table: SensitivityTable):
    fig = _spare_figure("sensitivity", (8, 4.2), ncols=1)
    table.plot(fig.axes[0])
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.92)
    return fig
