"""fxcompress: Deep Compression as torch.fx graph passes.

    gm = fxcompress.compile(model, passes=[...], example_inputs=(x,))
    print(fxcompress.summary(gm))
"""
from .analysis import Analysis, AnalysisCache
from .compile import compile
from .errors import (ConfigError, FormatError, FxCompressError, MissingDependencyError, PreconditionError,
                     TraceError, VerificationError)
from .history import format_history, history
from .pass_base import Pass, PassContext, PassRecord, PassResult

__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisCache", "ConfigError", "FormatError", "FxCompressError", "MissingDependencyError",
    "Pass", "PassContext", "PassRecord", "PassResult", "PreconditionError", "TraceError", "VerificationError",
    "compile", "format_history", "history",
]
