"""EncodedWeight: a graph module with no inputs that produces a weight from packed bytes.

It stores one uint8 buffer (`payload`: codebook, value stream, position stream, one after another)
and a plain-data header. The dense tensor is decoded on first use and cached (the cache is not part
of the state and is dropped on load or pickling).

A file's header is untrusted: building the module allocates nothing by its sizes (the payload buffer
starts empty and takes the size of the bytes attached to it), and `check_loaded` checks the header
against those bytes, and the shape against the owning layer, before anything is decoded.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxcompress.errors import ConfigError, FormatError
from fxcompress.layers import WeightTransform

from .tensor import DTYPES, EncodedTensor, decode_tensor, tensor_from_header


class EncodedWeight(WeightTransform):
    """A weight (or bias) kept as packed, entropy-coded bytes; `forward()` returns the dense tensor.

    `dtype` (None: the encoded tensor's own) is the dtype the model was converted to after lowering
    (`model.double()`, `.half()`): the payload is bytes, which a conversion leaves as they are, so the
    decoded tensor follows the conversion instead, as the float parameter it replaced would have.
    """

    def __init__(self, header: dict, bits: int | None = None, dtype: str | None = None) -> None:
        super().__init__()
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"EncodedWeight: dtype must be None or one of {sorted(DTYPES)}, got {dtype!r}")
        self.header = header
        self.bits = bits
        self.dtype = dtype
        self.register_buffer("payload", torch.zeros(0, dtype=torch.uint8))
        self._dense: torch.Tensor | None = None
        self._where = "encoded weight"  # the module path once check_loaded has named it

    @classmethod
    def from_encoded(cls, encoded: EncodedTensor, bits: int | None = None) -> EncodedWeight:
        parts = [encoded.codebook_data, encoded.values.table, encoded.values.payload]
        if encoded.positions is not None:
            parts += [encoded.positions.table, encoded.positions.payload]
        module = cls(encoded.header() | {"codebook_bytes": int(encoded.codebook_data.size)}, bits)
        module.payload = torch.from_numpy(np.concatenate(parts).astype(np.uint8))
        return module

    def encoded(self) -> EncodedTensor:
        """The EncodedTensor view of the header and payload; FormatError if they disagree."""
        payload = self.payload
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.device.type == "meta":
            raise FormatError(f"{self._where}: payload buffer is {payload.dtype} of shape {list(payload.shape)} "
                              f"on {payload.device}, expected loaded uint8 bytes")
        try:
            return tensor_from_header(self.header, payload.detach().cpu().numpy())
        except FormatError as exc:
            raise FormatError(f"{self._where}: {exc}") from None

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        """Check a module rebuilt from a file, once its payload is attached: the header against the
        payload's bytes and code tables, `bits`, and (given the model's root) the shape against the
        layer that owns this weight. Raises FormatError naming `path` and the part."""
        self._where = f"encoded weight {path}"
        if self.bits is not None and (type(self.bits) is not int or not 1 <= self.bits <= 32):
            raise FormatError(f"{self._where}: bits {self.bits!r} is not an integer in [1, 32]")
        encoded = self.encoded()
        owner, _, name = path.rpartition(".")
        if root is not None and owner:
            expected = layer_shapes(root.get_submodule(owner)).get(name.removesuffix("_encoded"))
            if expected is not None and tuple(encoded.shape) != expected:
                raise FormatError(f"{self._where}: header: shape {list(encoded.shape)} does not fit layer "
                                  f"{owner} ({type(root.get_submodule(owner)).__name__}), which needs {list(expected)}")

    def forward(self) -> torch.Tensor:
        if self._dense is None or self._dense.device != self.payload.device:
            encoded = self.encoded()
            try:
                dense = decode_tensor(encoded)
            except FormatError as exc:
                raise FormatError(f"{self._where}: {exc}") from None
            self._dense = dense.to(self.payload.device, None if self.dtype is None else DTYPES[self.dtype])
        return self._dense

    def _apply(self, fn, recurse=True):
        """Move the payload as `fn` says; where `fn` converts floats (model.double()), the decoded tensor
        is converted as its float parameter would have been: `fn` is asked what it makes of an empty
        tensor of the decoded dtype. A conversion to a dtype no encoded tensor has is refused by name."""
        header = self.header.get("dtype", "float32") if isinstance(self.header, dict) else "float32"
        decoded = DTYPES.get(self.dtype or header, torch.float32)
        target = fn(torch.empty(0, dtype=decoded, device=self.payload.device)).dtype
        if target is not decoded:
            name = str(target).removeprefix("torch.")
            if name not in DTYPES:
                raise ConfigError(f"{self._where}: decodes to {sorted(DTYPES)} only, cannot follow a conversion "
                                  f"to {target}")
            self.dtype, self._dense = (None if name == header else name), None
        return super()._apply(fn, recurse)

    def storage_bytes(self) -> dict[str, int]:
        return self.encoded().storage_bytes()

    def config(self) -> dict:
        # dtype only once converted: files of unconverted models stay as they were
        return {"header": self.header, "bits": self.bits} | ({"dtype": self.dtype} if self.dtype is not None else {})

    def extra_repr(self) -> str:
        h = self.header
        positions = h["positions"]["coding"] if h["positions"] else "none"
        return (f"shape={tuple(h['shape'])}, layout={h['layout']}, codebook={h['codebook']}, "
                f"values={h['values']['coding']}, positions={positions}, bytes={self.payload.numel()}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._dense = None
        incoming = state_dict.get(prefix + "payload")
        if isinstance(incoming, torch.Tensor):  # the buffer takes the size of the bytes it is given
            self.payload = torch.zeros(incoming.shape, dtype=torch.uint8, device=self.payload.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_dense"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__({"_where": "encoded weight", "dtype": None} | state)  # pickles from before these


def layer_shapes(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    """The weight and bias shapes a layer's configuration implies (empty for other modules)."""
    if isinstance(layer, nn.Linear):
        return {"weight": (layer.out_features, layer.in_features), "bias": (layer.out_features,)}
    if isinstance(layer, nn.modules.conv._ConvNd):
        channels = (layer.in_channels, layer.out_channels) if layer.transposed else \
            (layer.out_channels, layer.in_channels)
        return {"weight": (channels[0], channels[1] // layer.groups, *layer.kernel_size),
                "bias": (layer.out_channels,)}
    return {}
