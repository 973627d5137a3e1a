"""fxcompress: Deep Compression as torch.fx graph passes.

    gm = fxcompress.compile(model, passes=[...], example_inputs=(x,))
    print(fxcompress.summary(gm))
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
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisCache", "ChannelGraph", "ConfigError", "FormatError", "FxCompressError",
    "MissingDependencyError", "Pass", "PassContext", "PassRecord", "PassResult", "PreconditionError",
    "TraceError", "VerificationError", "SensitivityTable", "Summary", "channel_graph", "compile", "decode",
    "draw", "format_history", "history", "load", "register_function", "register_module", "save", "sensitivity",
    "summary", "to_networkx",
]
