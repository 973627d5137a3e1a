"""write_report(gm, path): gather the numbers and pictures of a compressed model and write the pages."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.fx import GraphModule

from ..config import check_int
from ..draw import DEFAULT_MAX_NODES, to_svg
from ..errors import ConfigError
from ..history import history
from ..sensitivity import SensitivityTable
from ..summary import summary
from .figures import available, bytes_and_sparsity, histogram, sensitivity_curves
from .collect import layer_weights
from .page import Content, to_html, to_markdown

DEFAULT_MAX_HISTOGRAMS = 12  # the largest layers get a histogram each; the page stays a few MB at most


@dataclass(frozen=True)
class ReportFiles:
    html: Path | None
    markdown: Path | None
    pictures: int  # PNG pictures inside the HTML (0 without matplotlib)


def _histograms(gm: GraphModule, reference: nn.Module | None, limit: int) -> tuple[list, list[str]]:
    weights = layer_weights(gm, reference)
    largest = sorted(weights, key=lambda w: -w.after.numel())[:limit]
    shown = [w for w in weights if w in largest]  # graph order
    notes = [f"Histograms of the {limit} largest of {len(weights)} layers."] if len(weights) > limit else []
    if shown and all(w.before is None for w in shown):
        notes.append("This model no longer holds its weights before quantization: pass a reference model "
                     "(the fake-quant or dense model) to show them.")
    return [(w.name, histogram(w), w.caption) for w in shown], notes


def build_content(gm: GraphModule, *, title: str, reference: nn.Module | None = None,
                  sensitivity: SensitivityTable | None = None, example_inputs: Any = None,
                  facts: Mapping[str, Any] | None = None, draw_graph: bool = True, pictures: bool = True,
                  max_nodes: int = DEFAULT_MAX_NODES, max_histograms: int = DEFAULT_MAX_HISTOGRAMS) -> Content:
    """The report's content: tables always, pictures when matplotlib is installed."""
    if not isinstance(gm, GraphModule):
        raise ConfigError(f"report.gm must be a torch.fx GraphModule (compile or load one), got {type(gm).__name__}")
    if sensitivity is not None and not isinstance(sensitivity, SensitivityTable):
        raise ConfigError(f"report.sensitivity must be a SensitivityTable, got {type(sensitivity).__name__}")
    check_int("report", "max_histograms", max_histograms, lo=0)
    table = summary(gm, example_inputs)
    graph = to_svg(gm, max_nodes, table) if draw_graph else None
    extra: dict = {}
    if pictures and available():
        histograms, notes = _histograms(gm, reference, max_histograms)
        extra = {"bars": bytes_and_sparsity(table.rows), "histograms": histograms, "notes": notes,
                 "sensitivity_plot": sensitivity_curves(sensitivity) if sensitivity else None}
    return Content(title=title, table=table, records=history(gm), graph_svg=graph,
                   facts={str(k): str(v) for k, v in (facts or {}).items()}, sensitivity=sensitivity, **extra)


OPTIONS = frozenset({"reference", "sensitivity", "example_inputs", "facts", "draw_graph", "max_nodes",
                     "max_histograms", "pictures"})  # write_report's keywords besides title and markdown


def write_report(gm: GraphModule, path: str | os.PathLike, *, title: str | None = None, markdown: bool = True,
                 **options: Any) -> ReportFiles:
    """Write the report of `gm` to `path`: a .html page with the Markdown beside it (same name, .md;
    markdown=False leaves it out), or only Markdown when `path` ends in .md.

    Options (all keywords): `reference` (a model holding the weights before quantization, for a
    lowered or encoded `gm`), `sensitivity` (a SensitivityTable: its curves and table),
    `example_inputs` (to count MACs), `facts` (name -> value lines at the top: accuracy, file size),
    `draw_graph`, `max_nodes` (the graph's collapse threshold), `max_histograms`.
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:  # a misspelt option would otherwise be a bare TypeError from build_content
        raise ConfigError(f"write_report: unknown option {unknown[0]!r}; the options are {', '.join(sorted(OPTIONS))}")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm", ".md"):
        raise ConfigError(f"report.path must end in .html or .md, got {path.name!r}")
    only_markdown = path.suffix.lower() == ".md"
    if only_markdown:
        options = {**options, "draw_graph": False, "pictures": False}
    content = build_content(gm, title=title or "fxcompress report", **options)
    page = None
    if not only_markdown:
        path.write_text(to_html(content), encoding="utf-8")
        page = path
    text = path if only_markdown else (path.with_suffix(".md") if markdown else None)
    if text is not None:
        text.write_text(to_markdown(content, None if page is None else page.name), encoding="utf-8")
    count = 0 if page is None else (content.bars is not None) + len(content.histograms) + bool(content.sensitivity_plot)
    return ReportFiles(page, text, count)
