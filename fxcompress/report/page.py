"""The report's text: one self-contained HTML page (inline CSS, PNG pictures as data: URIs, the graph
as inline SVG with zoom buttons; nothing is fetched) and the same tables as Markdown."""
from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..pass_base import PassRecord
from ..sensitivity import SensitivityTable
from ..summary import COLUMNS, Summary

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #222;
       max-width: 1180px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 34px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
th.text, td.text { text-align: left; }
table.facts td { text-align: left; } table.facts td:first-child { color: #555; }
table.summary { font-size: 12px; } table.summary th, table.summary td { padding: 2px 5px; }
tr.total td { font-weight: bold; background: #fafafa; }
.scroll { overflow-x: auto; } img { max-width: 100%; display: block; margin: 8px 0; }
.note { color: #666; font-size: 13px; } code, pre { font-size: 12.5px; }
.graph { overflow: auto; max-height: 900px; border: 1px solid #ddd; background: white; }
.zoom button { font-size: 13px; margin-right: 4px; }
td.wrap { text-align: left; white-space: normal; font-size: 12px; min-width: 220px; max-width: 420px; }
details summary { cursor: pointer; color: #335; }
figure { margin: 10px 0 18px; } figcaption { color: #555; font-size: 13px; margin-top: -4px; }
"""

ZOOM = """
<script>
function fxZoom(factor) {
  var svg = document.querySelector('.graph svg');
  var base = parseFloat(svg.getAttribute('data-width') || svg.getAttribute('width'));
  svg.setAttribute('data-width', base);
  var scale = factor === 0 ? 1 : (parseFloat(svg.getAttribute('data-scale') || 1) * factor);
  svg.setAttribute('data-scale', scale);
  var h = parseFloat(svg.getAttribute('viewBox').split(' ')[3]);
  svg.setAttribute('width', base * scale); svg.setAttribute('height', h * scale);
}
</script>
"""


@dataclass(frozen=True)
class Content:
    """Everything one report shows; pictures are data: URIs, absent when matplotlib is missing."""

    title: str
    table: Summary
    records: tuple[PassRecord, ...]
    facts: Mapping[str, str] = field(default_factory=dict)
    graph_svg: str | None = None
    bars: str | None = None
    histograms: Sequence[tuple[str, str, str]] = ()  # (layer, picture, caption)
    sensitivity: SensitivityTable | None = None
    sensitivity_plot: str | None = None
    notes: Sequence[str] = ()


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[str]], last_total: bool = False,
           kind: str = "") -> str:
    cells = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"] if head else []
    for i, row in enumerate(rows):
        total = ' class="total"' if last_total and i == len(rows) - 1 else ""
        cells.append(f"<tr{total}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f'<div class="scroll"><table class="{kind}">' + "".join(cells) + "</table></div>"


def _cell(value) -> str:
    """A summary value as the text tables print it (4 decimals below 10, shapes as 16x3x3x3)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _summary_html(table: Summary) -> str:
    rows = [[_cell(row.get(c)) for c in COLUMNS] for row in (*table.rows, table.totals)]
    ratio = table.totals["ratio"]
    exact = "exact" if table.totals["exact"] == "yes" else "estimated"
    return (_table(COLUMNS, rows, last_total=True, kind="summary")
            + f"<p>Compression ratio <b>{ratio:.2f}x</b> ({exact} bytes).</p>")


def _history_html(records: Sequence[PassRecord]) -> str:
    if not records:
        return '<p class="note">No passes applied.</p>'
    head = ["#", "pass", "config", "changed", "nodes +/-/~", "params", "seconds", "statistics"]
    text = {"pass", "config", "statistics"}  # left-aligned, as their cells
    cells = ["<tr>" + "".join(f'<th class="text">{h}</th>' if h in text else f"<th>{h}</th>" for h in head)
             + "</tr>"]
    for i, r in enumerate(records):
        config = ", ".join(f"{k}={v!r}" for k, v in r.config.items())
        stats = "; ".join(f"{k}: {json.dumps(v, default=str)[:200]}" for k, v in r.stats.items())
        values = [str(i), r.name, str(r.changed),
                  f"+{len(r.nodes_created)} -{len(r.nodes_erased)} ~{len(r.nodes_changed)}",
                  str(len(r.params_touched)), f"{r.seconds:.3f}" if r.seconds else "-"]  # 0.0: not recorded (a saved file)
        cells.append(f"<tr><td>{values[0]}</td><td class=\"text\">{html.escape(values[1])}</td>"
                     + f'<td class="wrap">{html.escape(config)}</td>'
                     + "".join(f"<td>{html.escape(v)}</td>" for v in values[2:])
                     + f'<td class="wrap"><details><summary>{len(r.stats)} entries</summary>'
                     f"{html.escape(stats)}</details></td></tr>")
    return '<div class="scroll"><table>' + "".join(cells) + "</table></div>"


def _pictures_missing() -> str:
    return ('<p class="note">matplotlib is not installed: the pictures are left out '
            "(pip install 'fxcompress[draw]'); the tables hold the same numbers.</p>")


def _weights_html(content: Content) -> str:
    if not content.histograms:
        return _pictures_missing() if content.bars is None else '<p class="note">No layer weights to show.</p>'
    parts = ['<p class="note">Each layer\'s nonzero weights before quantization (blue; grey where the model '
             "no longer holds them) with the centroids or grid levels in red, and how many weights each "
             "centroid or level took after quantization (as in the Deep Compression paper's figures).</p>"]
    for name, picture, caption in content.histograms:
        parts.append(f'<figure><img alt="weights of {html.escape(name)}" src="{picture}">'
                     + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "") + "</figure>")
    return "".join(parts)


def _graph_html(svg: str | None) -> str:
    if svg is None:
        return '<p class="note">The graph is left out (draw_graph=False).</p>'
    buttons = ('<div class="zoom"><button onclick="fxZoom(1.25)">zoom in</button>'
               '<button onclick="fxZoom(0.8)">zoom out</button><button onclick="fxZoom(0)">100%</button>'
               '<span class="note"> scroll to pan; hover a box for its node, target and the pass that '
               "made it</span></div>")
    return buttons + f'<div class="graph">{svg}</div>'


def _sensitivity_html(content: Content) -> str:
    table = content.sensitivity
    if table is None:
        return ""
    grid = [[layer, *(f"{v:.4f}" for v in row)] for layer, row in zip(table.layers, table.values)]
    picture = f'<img alt="sensitivity curves" src="{content.sensitivity_plot}">' if content.sensitivity_plot else ""
    return (f"<h2>Pruning sensitivity</h2><p>{html.escape(table.metric.capitalize())} with one layer alone "
            f"pruned to each sparsity ({table.granularity}-wise, smallest magnitudes first), the others "
            f"untouched; baseline {table.baseline:.4f} (nothing more pruned). A flat curve marks a layer that "
            f"takes that sparsity.</p>{picture}"
            + _table(["layer", *(f"{s:g}" for s in table.sparsities)], grid))


def to_html(content: Content) -> str:
    facts = _table(None, list(content.facts.items()), kind="facts") if content.facts else ""
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in content.notes)
    bars = (f'<img alt="bytes and sparsity per layer" src="{content.bars}">' if content.bars
            else _pictures_missing())
    body = [f"<h1>{html.escape(content.title)}</h1>", facts, notes,
            "<h2>Summary</h2>", _summary_html(content.table),
            "<h2>Bytes and sparsity per layer</h2>", bars,
            "<h2>Weights before and after quantization</h2>", _weights_html(content),
            _sensitivity_html(content),
            "<h2>Passes</h2>", _history_html(content.records),
            "<h2>Graph</h2>", _graph_html(content.graph_svg)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(content.title)}</title><style>{STYLE}</style>{ZOOM}</head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def to_markdown(content: Content, html_name: str | None = None) -> str:
    lines = [f"# {content.title}", ""]
    lines += [f"- {k}: {v}" for k, v in content.facts.items()] + ([""] if content.facts else [])
    lines += [*content.notes, ""] if content.notes else []
    lines += ["## Summary", "", content.table.to_markdown(), ""]
    if content.sensitivity is not None:
        lines += ["## Pruning sensitivity", "", content.sensitivity.to_markdown(), ""]
    lines += ["## Passes", "", "```", content.table.history or "(no passes applied)", "```", ""]
    if html_name:
        lines += [f"Pictures (bytes, sparsity, weight histograms, the graph): see {html_name}.", ""]
    return "\n".join(lines)
