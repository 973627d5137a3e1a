"""EncodedWeight: a graph module with no inputs that produces a weight from packed bytes.

It stores one uint8 buffer (`payload`: codebook, value stream, position stream, one after another)
and a plain-data header. The dense tensor is decoded on first use and cached (the cache is not part
of the state and is dropped on load or pickling).
"""
from __future__ import annotations

import numpy as np
import torch

from fxcompress.errors import FormatError
from fxcompress.layers import WeightTransform

from .streams import Stream
from .tensor import EncodedTensor, decode_tensor

_STREAM_KEYS = ("coding", "count", "alphabet", "table_bytes", "payload_bytes")


class EncodedWeight(WeightTransform):
    """A weight (or bias) kept as packed, entropy-coded bytes; `forward()` returns the dense tensor."""

    def __init__(self, header: dict, bits: int | None = None) -> None:
        super().__init__()
        self.header = header
        self.bits = bits
        self.register_buffer("payload", torch.zeros(_payload_bytes(header), dtype=torch.uint8))
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_encoded(cls, encoded: EncodedTensor, bits: int | None = None) -> EncodedWeight:
        parts = [encoded.codebook_data, encoded.values.table, encoded.values.payload]
        if encoded.positions is not None:
            parts += [encoded.positions.table, encoded.positions.payload]
        module = cls(encoded.header() | {"codebook_bytes": int(encoded.codebook_data.size)}, bits)
        module.payload.copy_(torch.from_numpy(np.concatenate(parts).astype(np.uint8)))
        return module

    def encoded(self) -> EncodedTensor:
        """The EncodedTensor view of the header and payload."""
        header, data = self.header, self.payload.detach().cpu().numpy()
        cursor = header["codebook_bytes"]
        codebook = data[:cursor]
        streams = []
        for key in ("values", "positions"):
            if header[key] is None:
                streams.append(None)
                continue
            stream, cursor = _stream(header[key], data, cursor)
            streams.append(stream)
        return EncodedTensor(tuple(header["shape"]), header["layout"], header["index_bits"], header["codebook"],
                             codebook, header["offset"], streams[0], streams[1])

    def forward(self) -> torch.Tensor:
        if self._dense is None or self._dense.device != self.payload.device:
            try:
                self._dense = decode_tensor(self.encoded()).to(self.payload.device)
            except (ValueError, IndexError, KeyError, TypeError) as exc:
                raise FormatError(f"encoded weight payload is inconsistent with its header: {exc}") from exc
        return self._dense

    def storage_bytes(self) -> dict[str, int]:
        return self.encoded().storage_bytes()

    def config(self) -> dict:
        return {"header": self.header, "bits": self.bits}

    def extra_repr(self) -> str:
        h = self.header
        positions = h["positions"]["coding"] if h["positions"] else "none"
        return (f"shape={tuple(h['shape'])}, layout={h['layout']}, codebook={h['codebook']}, "
                f"values={h['values']['coding']}, positions={positions}, bytes={self.payload.numel()}")

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_dense"] = None
        return state


def _payload_bytes(header: dict) -> int:
    total = header["codebook_bytes"]
    for key in ("values", "positions"):
        if header[key] is not None:
            total += header[key]["table_bytes"] + header[key]["payload_bytes"]
    return total


def _stream(header: dict, data: np.ndarray, cursor: int) -> tuple[Stream, int]:
    table_end = cursor + header["table_bytes"]
    end = table_end + header["payload_bytes"]
    meta = {k: v for k, v in header.items() if k not in _STREAM_KEYS}
    stream = Stream(header["coding"], header["count"], header["alphabet"], meta,
                    data[cursor:table_end], data[table_end:end])
    return stream, end
