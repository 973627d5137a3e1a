"""The report of a compressed model: one self-contained HTML page (and its Markdown) with the summary
table, per-layer bytes and sparsity, weight histograms with the centroids marked, sensitivity curves,
the pass history and the graph.

    fxcompress.report.write_report(gm, "report.html", reference=fake_quant_model, sensitivity=table)
"""
from .build import ReportFiles, build_content, write_report
from .collect import LayerWeights, layer_weights

__all__ = ["LayerWeights", "ReportFiles", "build_content", "layer_weights", "write_report"]
