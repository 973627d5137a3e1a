"""Every error fxcompress raises on purpose. Catch `FxCompressError` to catch them all."""


class FxCompressError(Exception):
    """Base class of all fxcompress errors."""


class ConfigError(FxCompressError, ValueError):
    """A pass, rule or option was given a bad value; the message names the field or rule line."""


class TraceError(FxCompressError):
    """torch.fx could not trace the model; the message names the module path and the op."""


class PreconditionError(FxCompressError):
    """A pass cannot run on this graph (e.g. it needs calibration data that was not given)."""


class VerificationError(FxCompressError):
    """The graph failed verification after a pass; the message names the pass and the node."""


class FormatError(FxCompressError):
    """A saved file is truncated, corrupted or of an unknown version; the message names the segment."""


class MissingDependencyError(FxCompressError, ImportError):
    """An optional extra (matplotlib, onnx, ...) is needed for this call and is not installed."""


class UnknownOpError(PreconditionError):
    """A pass changed nothing on a graph holding ops it does not know (compile(..., strict=True));
    the message names each op with its module path and source line."""


class UnknownOpWarning(UserWarning):
    """The same as UnknownOpError, as a warning: compile's default (strict=False)."""


class TiedLayerWarning(UserWarning):
    """A pass's selection named a layer whose weight is tied to a layer it did not select (an LM head
    tied to its token embedding): that weight is left as it is."""
