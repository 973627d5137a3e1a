"""fxcompress: Deep Compression as torch.fx graph passes.

    gm = fxcompress.compile(model, passes=[...], example_inputs=(x,))
    print(fxcompress.summary(gm))
    fxcompress.write_report(gm, "report.html", reference=fake_quant_gm, sensitivity=table)

`write_report(gm, path, *, title=None, markdown=True, reference=None, sensitivity=None,
example_inputs=None, facts=None, draw_graph=True, max_nodes=120, max_histograms=12)` writes one
self-contained HTML page (summary, bytes and sparsity per layer, weight histograms before and after
quantization with the centroids or grid levels marked, sensitivity curves, pass history, the graph)
and its Markdown beside it; a path ending in .md writes only the Markdown. `reference` is a model
holding the weights before quantization (the fake-quant or dense model of a lowered `gm`);
`sensitivity` a `SensitivityTable` (`fxcompress.sensitivity(...)`, or `SensitivityTable.load(path)`).
Pictures need matplotlib (the draw extra); without it the page keeps its tables and the graph.
"""
from .analysis import Analysis, AnalysisCache
from .channels import ChannelGraph
from .compile import compile
from .draw import draw, to_networkx
from .encoded.decode import decode
from .errors import (ConfigError, FormatError, FxCompressError, MissingDependencyError, PreconditionError,
                     TraceError, VerificationError)
from .fileformat import load, register_function, register_module, save
from .history import format_history, history
from .inspection import channel_graph
from .pass_base import Pass, PassContext, PassRecord, PassResult
from .sensitivity import SensitivityTable, sensitivity
from .report import write_report
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisCache", "ChannelGraph", "ConfigError", "FormatError", "FxCompressError",
    "MissingDependencyError", "Pass", "PassContext", "PassRecord", "PassResult", "PreconditionError",
    "TraceError", "VerificationError", "SensitivityTable", "Summary", "channel_graph", "compile", "decode",
    "draw", "format_history", "history", "load", "register_function", "register_module", "save", "sensitivity",
    "summary", "to_networkx", "write_report",
]
