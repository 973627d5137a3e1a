"""save / load: a versioned, checksummed container that never unpickles and never executes code.

Layout (all integers little-endian; docs/file-format.md has the full description):

    offset  size  field
    0       8     magic b"\\x89FXC\\r\\n\\x1a\\n"
    8       2     format version (1)
    10      4     manifest length in bytes (M)
    14      4     CRC32 of the manifest
    18      4     CRC32 of bytes 0..17 (this header)
    22      M     manifest: zlib-compressed UTF-8 JSON (graph, modules, tensor table, history)
    22+M    ...   tensor segments, raw little-endian bytes, at the offsets the tensor table gives,
                  each with its own CRC32; the file ends exactly after the last segment
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.fx import GraphModule

from fxcompress.errors import FormatError
from fxcompress.history import history, set_history
from fxcompress.pass_base import PassRecord

from .allowlist import DTYPES
from .graphdata import graph_from_data, graph_to_data, modules_from_data, modules_to_data

MAGIC = b"\x89FXC\r\n\x1a\n"
VERSION = 1
_HEADER = struct.Struct("<8sHII")  # magic, version, manifest length, manifest CRC32; then the header's CRC32
HEADER_BYTES = _HEADER.size + 4


def _tensors(gm: GraphModule) -> list[tuple[str, str, torch.Tensor]]:
    found = [(name, "parameter", p) for name, p in gm.named_parameters()]
    found += [(name, "buffer", b) for name, b in gm.named_buffers()]
    return found


def _raw(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def to_bytes(gm: GraphModule) -> bytes:
    """The file contents for `gm` (see the module docstring)."""
    segments, table, offset = [], [], 0
    for name, kind, tensor in _tensors(gm):
        data = _raw(tensor)
        table.append({"name": name, "kind": kind, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "shape": list(tensor.shape), "offset": offset, "length": len(data),
                      "crc32": zlib.crc32(data), "requires_grad": bool(tensor.requires_grad)})
        segments.append(data)
        offset += len(data)
    manifest = {"graph": graph_to_data(gm), "modules": modules_to_data(gm), "tensors": table,
                "history": [r.as_dict() for r in history(gm)], "data_bytes": offset}
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = _HEADER.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed))
    return b"".join([header, struct.pack("<I", zlib.crc32(header)), packed, *segments])


def save(gm: GraphModule, path: str | os.PathLike) -> int:
    """Write `gm` to `path` atomically (temp file in the same folder, then rename); returns the size."""
    data = to_bytes(gm)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def load(path: str | os.PathLike) -> GraphModule:
    """Read a file written by `save`; any damage raises FormatError naming the segment."""
    return from_bytes(Path(path).read_bytes())


def from_bytes(data: bytes) -> GraphModule:
    manifest, start = _read_manifest(data)
    try:
        root = modules_from_data(manifest["modules"])
        _load_tensors(root, manifest["tensors"], data, start, manifest["data_bytes"])
        gm = GraphModule(root, graph_from_data(manifest["graph"]))
        gm.graph.lint()
        set_history(gm, tuple(PassRecord.from_dict(r) for r in manifest["history"]))
    except FormatError:
        raise
    except Exception as exc:  # a manifest that passed its checksum but does not describe a model
        raise FormatError(f"manifest: does not describe a valid model ({type(exc).__name__}: {exc})") from exc
    return gm


def _read_manifest(data: bytes) -> tuple[dict, int]:
    if len(data) < HEADER_BYTES:
        raise FormatError(f"header: file is truncated ({len(data)} bytes, the header alone is {HEADER_BYTES})")
    magic, version, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("header: not an fxcompress file (bad magic bytes)")
    if zlib.crc32(data[:_HEADER.size]) != struct.unpack_from("<I", data, _HEADER.size)[0]:
        raise FormatError("header: checksum mismatch (the file is corrupted)")
    if version != VERSION:
        raise FormatError(f"header: format version {version} is not supported (this reader knows {VERSION})")
    packed = data[HEADER_BYTES:HEADER_BYTES + length]
    if len(packed) != length:
        raise FormatError("manifest: file is truncated inside the manifest")
    if zlib.crc32(packed) != crc:
        raise FormatError("manifest: checksum mismatch (the file is corrupted)")
    try:
        return json.loads(zlib.decompress(packed)), HEADER_BYTES + length
    except (zlib.error, ValueError) as exc:
        raise FormatError(f"manifest: cannot be decoded ({exc})") from exc


def _load_tensors(root: torch.nn.Module, table: list[dict], data: bytes, start: int, data_bytes: int) -> None:
    if len(data) != start + data_bytes:
        what = "truncated" if len(data) < start + data_bytes else "followed by unexpected bytes"
        raise FormatError(f"tensor data: file is {what} ({len(data)} bytes, expected {start + data_bytes})")
    for entry in table:
        root_attr(root, entry, _tensor(entry, data, start))
    saved = {e["name"] for e in table}
    for path, module in root.named_modules():
        for store in (module._parameters, module._buffers):
            for name in [n for n, t in store.items() if t is not None and _join(path, n) not in saved]:
                store[name] = None  # a rebuilt layer's own tensor that the saved model did not have


def _tensor(entry: dict, data: bytes, start: int) -> torch.Tensor:
    name = entry["name"]
    if entry["dtype"] not in DTYPES:
        raise FormatError(f"tensor {name}: dtype {entry['dtype']!r} is not supported")
    dtype = DTYPES[entry["dtype"]]
    np_dtype = np.dtype(torch.empty(0, dtype=dtype if dtype != torch.bfloat16 else torch.int16).numpy().dtype)
    segment = data[start + entry["offset"]:start + entry["offset"] + entry["length"]]
    if len(segment) != entry["length"] or entry["length"] != np_dtype.itemsize * int(np.prod(entry["shape"])):
        raise FormatError(f"tensor {name}: segment length does not match its shape")
    if zlib.crc32(segment) != entry["crc32"]:
        raise FormatError(f"tensor {name}: checksum mismatch (the file is corrupted)")
    array = np.frombuffer(segment, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(entry["shape"])
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def root_attr(root: torch.nn.Module, entry: dict, tensor: torch.Tensor) -> None:
    parent, _, name = entry["name"].rpartition(".")
    module = root.get_submodule(parent)
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    if entry["kind"] == "parameter":
        module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=entry["requires_grad"]))
    else:
        module.register_buffer(name, tensor)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
