"""save / load: a versioned, checksummed container that never unpickles and never executes code.

Layout (all integers little-endian; docs/file-format.md has the full description):

    offset  size  field
    0       8     magic b"\\x89FXC\\r\\n\\x1a\\n"
    8       2     format version (2; version 1 files, which record no input shapes, still load)
    10      4     manifest length in bytes (M)
    14      4     CRC32 of the manifest
    18      4     CRC32 of bytes 0..17 (this header)
    22      M     manifest: zlib-compressed UTF-8 JSON (graph, modules, tensor table, history)
                  and, from version 2, the example inputs' shapes and dtypes (`inputs`, null if unknown)
    22+M    ...   tensor segments, raw little-endian bytes, at the offsets the tensor table gives,
                  each with its own CRC32; the file ends exactly after the last segment

`save` streams: the CRC32s are computed a tensor at a time to write the manifest, then each tensor's
bytes are written after it (no whole-file buffer), into a temporary file renamed into place when
complete. `load(path, mmap=True)` maps the file instead of reading it, after the same checks.
Before returning, load runs the graph once on meta tensors of the recorded inputs (`dryrun.py`), so a
graph that cannot run on them is a FormatError naming the node, not an error at the first forward.
"""
from __future__ import annotations

import io
import json
import math
import mmap as mmap_module
import os
import struct
import sys
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.fx import GraphModule

from fxcompress.errors import FormatError
from fxcompress.history import history, set_history
from fxcompress.pass_base import PassRecord

from .allowlist import DTYPES, MODULE_NAMES
from .dryrun import dry_run, record_inputs
from .graphdata import fail, graph_from_data, graph_to_data, modules_from_data, modules_to_data, split_slot

MAGIC = b"\x89FXC\r\n\x1a\n"
VERSION = 3
# what this reader knows: version 1 files have no `inputs` and load without a dry run; version 3 adds
# buffers that stay out of the state_dict (`non_persistent_buffer`) and modules held under two paths (`alias`)
VERSIONS = (1, 2, 3)
# the method a module that keeps some of its buffers in another form between calls (a native layer's codes in its
# kernel's packed weight) defines to register them again before its buffers are read
HOLD_BUFFERS = "hold_buffers"
_HEADER = struct.Struct("<8sHII")  # magic, version, manifest length, manifest CRC32; then the header's CRC32
HEADER_BYTES = _HEADER.size + 4
# Bounds on the manifest, relative to its compressed size M. Real manifests (24-block models included)
# inflate 4-19x and hold at most 2.5 JSON tokens per compressed byte; a crafted zlib stream reaches
# 1000x. The text may inflate to MANIFEST_RATIO * M + MANIFEST_SLACK bytes and hold MANIFEST_TOKENS * M
# + MANIFEST_TOKEN_SLACK tokens (`,` `:` `[` `{`); the tokens bound what parsing allocates (docs/file-format.md).
# The slacks are what a tiny real manifest needs (an empty model's: 306 bytes, 58 tokens) with room to spare,
# and no more: parsed, each token can cost about 60 bytes, so a slack of a million tokens let a 1 KB file
# cost 48 MiB.
MANIFEST_RATIO = 64
MANIFEST_TOKENS = 4
MANIFEST_SLACK = 1 << 16
MANIFEST_TOKEN_SLACK = 1 << 14
_INFLATE_CHUNK = 1 << 16  # what one decompress call may add: a small file costs no more
MAX_JSON_DEPTH = 64  # real manifests nest about 10 levels
MAX_TENSOR_DIMS = 32
_MANIFEST_KEYS = {"graph", "modules", "tensors", "history", "data_bytes"}
_KEYS_BY_VERSION = {1: _MANIFEST_KEYS, 2: _MANIFEST_KEYS | {"inputs"}, 3: _MANIFEST_KEYS | {"inputs"}}
# a tensor entry's kind -> the module store it fills
_STORES = {"parameter": "_parameters", "buffer": "_buffers", "non_persistent_buffer": "_buffers"}
_TENSOR_KEYS = {"name", "kind", "dtype", "shape", "offset", "length", "crc32", "requires_grad"}
_HISTORY_TYPES = {"name": str, "config": dict, "changed": bool, "nodes_created": list, "nodes_erased": list,
                  "nodes_changed": list, "params_touched": list, "stats": dict, "seconds": (int, float)}


_SAVED_DTYPES = frozenset(DTYPES.values())
_TIE_KEYS = {"name", "same_as"}  # a second name of a tensor stored earlier (an LM head tied to its embedding)


def _tensors(gm: GraphModule) -> list[tuple[str, str, torch.Tensor]]:
    # every name of a shared tensor: the first carries its bytes, the others name it (`same_as`)
    found = [(name, "parameter", p) for name, p in gm.named_parameters(remove_duplicate=False)]
    found += [(name, _buffer_kind(gm, name), b) for name, b in gm.named_buffers(remove_duplicate=False)]
    return found


def _buffer_kind(gm: GraphModule, name: str) -> str:
    owner, _, slot = name.rpartition(".")
    persistent = slot not in gm.get_submodule(owner)._non_persistent_buffers_set
    return "buffer" if persistent else "non_persistent_buffer"


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, little-endian, without a copy when it is already a contiguous CPU tensor."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    array = np.ascontiguousarray(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False))
    return memoryview(array.reshape(-1).view(np.uint8))  # flat bytes (a view: no copy)


def _recorded_inputs(gm: GraphModule, example_inputs: object) -> list | None:
    """What the file records of the inputs, checked by the dry run load will do. Inputs the caller gave
    that the graph cannot run are refused; shapes the graph carries from an earlier compile that it no
    longer runs on (edited since) are left out, with a warning: the file then loads without a dry run."""
    inputs = record_inputs(gm, example_inputs)
    if inputs is not None:
        try:
            dry_run(gm, inputs)
        except FormatError as exc:
            if example_inputs is not None:
                raise FormatError(f"cannot save: the graph does not run on save.example_inputs: {exc}") from None
            warnings.warn(f"save: the graph does not run on the input shapes compile recorded on it ({exc}); the "
                          "file records no input shapes, so load cannot check it (pass save(..., example_inputs=...))",
                          UserWarning, stacklevel=4)
            return None
    return inputs


def _layout(gm: GraphModule, deterministic: bool, example_inputs: object = None) -> tuple[bytes, list[torch.Tensor]]:
    """(header and manifest bytes, the tensors whose bytes follow, in order). Each tensor's CRC32 is
    computed from its bytes one tensor at a time, so no more than one tensor's bytes are held."""
    for module in gm.modules():  # a module that keeps some buffers in another form between calls (a native
        hold = getattr(module, HOLD_BUFFERS, None)  # layer's codes in its kernel's) registers them again:
        if callable(hold):  # the file holds its buffers
            hold()
    inputs = _recorded_inputs(gm, example_inputs)
    table, stored, offset, first_name = [], [], 0, {}
    for name, kind, tensor in _tensors(gm):
        if id(tensor) in first_name:  # stored once, the tie kept: loading gives both names one tensor
            table.append({"name": name, "same_as": first_name[id(tensor)]})
            continue
        first_name[id(tensor)] = name
        if tensor.dtype not in _SAVED_DTYPES:
            raise FormatError(f"cannot save tensor {name!r}: dtype {str(tensor.dtype).removeprefix('torch.')} is not "
                              f"supported (the format holds {', '.join(DTYPES)})")
        data = _raw(tensor)
        table.append({"name": name, "kind": kind, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "shape": list(tensor.shape), "offset": offset, "length": len(data),
                      "crc32": zlib.crc32(data), "requires_grad": bool(tensor.requires_grad)})
        stored.append(tensor)
        offset += len(data)
    records = [r.as_dict() | ({"seconds": 0.0} if deterministic else {}) for r in history(gm)]
    manifest = {"graph": graph_to_data(gm), "modules": modules_to_data(gm), "tensors": table,
                "history": records, "data_bytes": offset, "inputs": inputs}
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = _HEADER.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed))
    return header + struct.pack("<I", zlib.crc32(header)) + packed, stored


def _write(gm: GraphModule, out: BinaryIO, deterministic: bool, example_inputs: object = None) -> int:
    """Write the file to `out`: the header and manifest, then each tensor's bytes as they are made."""
    head, stored = _layout(gm, deterministic, example_inputs)
    size = out.write(head)
    for tensor in stored:
        size += out.write(_raw(tensor))
    return size


def to_bytes(gm: GraphModule, *, deterministic: bool = True, example_inputs: object = None) -> bytes:
    """The file contents for `gm` (see the module docstring and `save`).

    `deterministic` zeroes the pass history's wall-clock seconds, so the same model, seed and
    passes give byte-identical files.
    """
    buffer = io.BytesIO()
    _write(gm, buffer, deterministic, example_inputs)
    return buffer.getvalue()


def save(gm: GraphModule, path: str | os.PathLike, *, deterministic: bool = True,
         example_inputs: object = None) -> int:
    """Write `gm` to `path` atomically; returns the size.

    The file records the shape and dtype of each input (batch dimension included), which `load`
    checks the graph against: from `example_inputs` when given (tensors, or tuples of them), else from
    the shapes compile wrote to the placeholders. A GraphModule that never went through compile and
    is saved without `example_inputs` records none, and loads without that check. The graph is run
    on meta tensors of what is recorded first: `example_inputs` it cannot run are a FormatError naming
    the node; shapes left from compile that it no longer runs on are not recorded (a UserWarning).

    The tensors' bytes are streamed to a temporary file beside the target (no whole-file buffer),
    which is flushed to disk and renamed over `path` only when complete: on any error the temporary
    file is removed and `path` is left as it was. With `deterministic` (the default) the pass
    history's timings are stored as 0.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp's is 0600: other readers (a model server) could not open it
        with os.fdopen(fd, "wb") as f:
            size = _write(gm, f, deterministic, example_inputs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def _file_mode(path: Path) -> int:
    """The mode `path` has, or a new file's (what `open` would give it under the process's umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def load(path: str | os.PathLike, *, mmap: bool = False) -> GraphModule:
    """Read a file written by `save`; any damage raises FormatError naming the part.

    With `mmap=True` the file is mapped (copy-on-write: the model may change its tensors, the file
    never changes) instead of read: encoded weights keep their payloads in the mapped pages and
    decode them on first use, and other tensors whose bytes are aligned for their type map too.
    Every check of a plain load runs first (sizes against the file, every segment's CRC32), and
    the pages read for a check are handed back, so opening costs little memory.
    Never runs code from the file (docs/file-format.md, "What load guarantees").
    """
    if not mmap:
        return from_bytes(Path(path).read_bytes())
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < HEADER_BYTES:
            raise FormatError(f"header: file is truncated ({os.fstat(f.fileno()).st_size} bytes, the header "
                              f"alone is {HEADER_BYTES})")
        mapped = mmap_module.mmap(f.fileno(), 0, access=mmap_module.ACCESS_COPY)
    return _from_buffer(mapped, mapped=mapped)


def from_bytes(data: bytes) -> GraphModule:
    return _from_buffer(data)


def _from_buffer(data, mapped: mmap_module.mmap | None = None) -> GraphModule:
    """The model in `data` (bytes, or the file's mapping, which tensors may then keep pointing into)."""
    manifest, start = _read_manifest(data)
    inputs = manifest.pop("inputs", None)
    try:
        root = modules_from_data(manifest["modules"])
        _load_tensors(root, manifest["tensors"], data, start, manifest["data_bytes"], mapped)
        _check_loaded(root)
        gm = GraphModule(root, graph_from_data(manifest["graph"], root))
        _keep_out_of_state_dict(gm, manifest["tensors"])
        gm.graph.lint()
        set_history(gm, _history(manifest["history"]))
        if inputs is not None:
            dry_run(gm, inputs)  # before any forward: a graph its recorded inputs cannot run is refused here
    except FormatError:
        raise
    except Exception as exc:  # defence in depth: every check above should have named the part already
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
    if version not in VERSIONS:
        raise FormatError(f"header: format version {version} is not supported (this reader knows {VERSIONS})")
    packed = data[HEADER_BYTES:HEADER_BYTES + length]
    if len(packed) != length:
        raise FormatError("manifest: file is truncated inside the manifest")
    if zlib.crc32(packed) != crc:
        raise FormatError("manifest: checksum mismatch (the file is corrupted)")
    manifest = _parse(_inflate(packed))
    if not isinstance(manifest, dict) or set(manifest) != _KEYS_BY_VERSION[version]:
        raise FormatError(f"manifest: must be an object with exactly the keys {sorted(_KEYS_BY_VERSION[version])} "
                          f"(format version {version})")
    return manifest, HEADER_BYTES + length


def _inflate(packed: bytes) -> bytearray:
    """The manifest's JSON text, inflated a chunk at a time and refused as soon as it passes its bound."""
    limit = MANIFEST_RATIO * len(packed) + MANIFEST_SLACK
    inflater, text, pending = zlib.decompressobj(), bytearray(), packed
    try:
        while not inflater.eof and len(text) <= limit and pending:
            text += inflater.decompress(pending, _INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise FormatError(f"manifest: cannot be decompressed ({exc})") from None
    if len(text) > limit:
        raise FormatError(f"manifest: inflates beyond {limit} bytes ({MANIFEST_RATIO}x its compressed size "
                          f"+ {MANIFEST_SLACK}), refused")
    if not inflater.eof or inflater.unused_data:
        raise FormatError("manifest: the compressed stream is truncated or followed by other bytes")
    tokens = sum(text.count(token) for token in (b",", b":", b"[", b"{"))
    if tokens > MANIFEST_TOKENS * len(packed) + MANIFEST_TOKEN_SLACK:
        raise FormatError(f"manifest: {tokens} JSON tokens exceed the bound of {MANIFEST_TOKENS} per compressed "
                          f"byte + {MANIFEST_TOKEN_SLACK}, refused")
    return text


def _parse(text: bytearray) -> object:
    try:
        manifest = json.loads(text)
    except RecursionError:
        raise FormatError("manifest: JSON nested too deeply") from None
    except ValueError as exc:
        raise FormatError(f"manifest: cannot be decoded ({exc})") from None
    _check_depth(manifest)
    return manifest


def _check_depth(value: object) -> None:
    """Refuse JSON nested beyond MAX_JSON_DEPTH (iteratively: deep data must not exhaust the stack)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"manifest: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        pending.extend((child, depth + 1) for child in children)


def _load_tensors(root: torch.nn.Module, table: object, data: bytes, start: int, data_bytes: object,
                  mapped: mmap_module.mmap | None = None) -> None:
    """Attach every tensor of the table; entries must tile the data region exactly, in order."""
    if not isinstance(data_bytes, int) or isinstance(data_bytes, bool) or data_bytes < 0:
        raise FormatError("manifest: data_bytes must be a non-negative integer")
    if len(data) != start + data_bytes:
        what = "truncated" if len(data) < start + data_bytes else "followed by unexpected bytes"
        raise FormatError(f"tensor data: file is {what} ({len(data)} bytes, expected {start + data_bytes})")
    if not isinstance(table, list):
        raise FormatError("manifest: tensors: must be a list")
    seen, offset, loaded = set(), 0, {}
    for index, entry in enumerate(table):
        if isinstance(entry, dict) and set(entry) == _TIE_KEYS:
            _attach_tie(root, entry, index, seen, loaded)
            continue
        name = _check_entry(entry, index, seen, offset, data_bytes)
        module, slot = split_slot(root, name, f"tensor {name!r}")
        _check_slot(module, slot, entry)
        _attach(module, slot, entry, _tensor(entry, memoryview(data)[start:], start, mapped))
        loaded[name] = (entry, getattr(module, slot))
        seen.add(name)
        offset += entry["length"]
    if offset != data_bytes:
        raise FormatError(f"tensor data: the table covers {offset} of its {data_bytes} bytes")
    _drop_unsaved(root)


def _attach_tie(root: torch.nn.Module, entry: dict, index: int, seen: set, loaded: dict) -> None:
    """A second name of a tensor the table stored earlier: its slot gets that very tensor (no bytes)."""
    name, first = entry["name"], entry["same_as"]
    where = f"tensor {name!r}" if isinstance(name, str) else f"tensor #{index}"
    if not isinstance(name, str) or name in seen:
        raise fail(where, "name must be a string, used once")
    if not isinstance(first, str) or first not in loaded:
        raise fail(where, f"same_as {first!r} must name a tensor stored earlier in the table")
    stored, tensor = loaded[first]
    module, slot = split_slot(root, name, where)
    _check_slot(module, slot, stored | {"name": name})
    _register(module, slot, stored["kind"], tensor)  # the very tensor: the tie holds
    seen.add(name)


def _check_entry(entry: object, index: int, seen: set, offset: int, data_bytes: int) -> str:
    """The entry's name, once its fields have the right types and its bytes the right place and size."""
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise FormatError(f"manifest: tensor #{index}: must have exactly the keys {sorted(_TENSOR_KEYS)}")
    name = entry["name"]
    where = f"tensor {name!r}" if isinstance(name, str) else f"tensor #{index}"
    shape, length = entry["shape"], entry["length"]
    if not isinstance(name, str) or name in seen:
        raise fail(where, "name must be a string, used once")
    if entry["kind"] not in _STORES or not isinstance(entry["requires_grad"], bool):
        raise fail(where, f"kind must be one of {sorted(_STORES)} and requires_grad a boolean")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
        raise fail(where, f"dtype {entry['dtype']!r} is not supported")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(_is_count(d) and d < 2 ** 48 for d in shape)):
        raise fail(where, f"shape must be at most {MAX_TENSOR_DIMS} non-negative integers")
    if not all(_is_count(entry[k]) for k in ("offset", "length", "crc32")):
        raise fail(where, "offset, length and crc32 must be non-negative integers")
    if entry["offset"] != offset or offset + length > data_bytes:
        raise fail(where, f"bytes [{entry['offset']}, +{length}) do not follow the previous tensor "
                          f"(at {offset}) inside the {data_bytes} data bytes")
    if length != _itemsize(DTYPES[entry["dtype"]]) * math.prod(shape):
        raise fail(where, f"segment length {length} does not match shape {shape} of {entry['dtype']}")
    return name


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _check_slot(module: torch.nn.Module, slot: str, entry: dict) -> None:
    """An existing slot keeps its kind, shape and kind of dtype (a module with `check_loaded` checks its
    own shapes); a new slot may not shadow an attribute."""
    where = f"tensor {entry['name']!r}"
    store = getattr(module, _STORES[entry["kind"]])
    if slot in module._parameters or slot in module._buffers:
        if slot not in store:
            raise fail(where, f"is stored as a {entry['kind']}, but the rebuilt module has it as the other kind")
        current = store[slot]
        dtype = DTYPES[entry["dtype"]]
        if current is not None and not hasattr(type(module), "check_loaded") and (list(current.shape) != entry["shape"]
                                    or current.dtype.is_floating_point != dtype.is_floating_point
                                    or (not dtype.is_floating_point and current.dtype != dtype)):
            raise fail(where, f"{entry['dtype']}{entry['shape']} does not fit the module's slot "
                              f"{str(current.dtype).removeprefix('torch.')}{list(current.shape)}")
    elif slot in module._modules or hasattr(module, slot):
        raise fail(where, f"slot {slot!r} would replace an attribute of {type(module).__name__}")


def _tensor(entry: dict, region: memoryview, start: int = 0, mapped: mmap_module.mmap | None = None) -> torch.Tensor:
    """The tensor of one entry, checked, from its bytes: one copy, no larger than the segment; from a
    mapping, no copy at all where the bytes are aligned for the type (always, for byte payloads)."""
    name, offset, length = entry["name"], entry["offset"], entry["length"]
    segment = region[offset:offset + length]
    if zlib.crc32(segment) != entry["crc32"]:
        raise FormatError(f"tensor {name}: checksum mismatch (the file is corrupted)")
    dtype = DTYPES[entry["dtype"]]
    stored = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}.get(dtype, dtype)
    np_dtype = torch.empty(0, dtype=stored).numpy().dtype
    if mapped is not None:
        _release(mapped, start + offset, length)  # the checksum's reads: pages the model may never use
    if mapped is not None and length and (start + offset) % np_dtype.itemsize == 0 and sys.byteorder == "little":
        array = np.frombuffer(segment, dtype=np_dtype).reshape(entry["shape"])  # the mapped pages themselves
    else:
        array = np.frombuffer(segment, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(entry["shape"])
    if dtype == torch.bool and array.size and array.max() > 1:
        raise fail(f"tensor {name!r}", "a bool tensor holds bytes other than 0 and 1")
    tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype in (torch.bfloat16, torch.bool) else tensor


def _release(mapped: mmap_module.mmap, start: int, length: int) -> None:
    """Drop the process's copy of the pages of [start, start + length) (unmodified: they are read
    again from the file when used)."""
    advise = getattr(mapped, "madvise", None)
    page = mmap_module.PAGESIZE
    first = start // page * page
    if advise is not None and hasattr(mmap_module, "MADV_DONTNEED") and length >= page:
        advise(mmap_module.MADV_DONTNEED, first, start + length - first)


def _attach(module: torch.nn.Module, slot: str, entry: dict, tensor: torch.Tensor) -> None:
    if entry["kind"] == "parameter":
        if entry["requires_grad"] and not (tensor.is_floating_point() or tensor.is_complex()):
            raise fail(f"tensor {entry['name']!r}", "an integer parameter cannot require gradients")
        tensor = torch.nn.Parameter(tensor, requires_grad=entry["requires_grad"])
    _register(module, slot, entry["kind"], tensor)


def _register(module: torch.nn.Module, slot: str, kind: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in `slot` as a parameter or a buffer, replacing what the rebuilt module had there (a buffer
    the file or its constructor makes non-persistent stays so: its state_dict is the saved module's)."""
    persistent = kind != "non_persistent_buffer" and slot not in module._non_persistent_buffers_set
    module._parameters.pop(slot, None)
    module._buffers.pop(slot, None)
    if kind == "parameter":
        module.register_parameter(slot, tensor)
    else:
        module.register_buffer(slot, tensor, persistent=persistent)


def _keep_out_of_state_dict(gm: GraphModule, table: list) -> None:
    """The file's non-persistent buffers stay so in the GraphModule (torch.fx registers the buffers a graph
    reads by `get_attr` again on the modules it makes, as persistent ones)."""
    for entry in table:
        if entry.get("kind") == "non_persistent_buffer":
            module, slot = split_slot(gm, entry["name"], f"tensor {entry['name']!r}")
            module._non_persistent_buffers_set.add(slot)


def _drop_unsaved(root: torch.nn.Module) -> None:
    """Slots the file left on the meta device: a standard layer's are dropped (the saved model had none,
    e.g. a lowered layer's float weight); fxcompress's own modules need all of theirs."""
    for path, module in root.named_modules():
        for store in (module._parameters, module._buffers):
            for name in [n for n, t in store.items() if t is not None and t.is_meta]:
                if type(module) not in MODULE_NAMES:
                    raise fail(f"module {path!r}", f"tensor {name!r} is missing from the tensor table")
                store[name] = None


def _check_loaded(root: torch.nn.Module) -> None:
    """Let each module check itself against its tensors (an encoded weight its header against its
    payload, and its shape against the layer it feeds: hence the root)."""
    for path, module in root.named_modules():
        if callable(getattr(type(module), "check_loaded", None)):
            module.check_loaded(path, root)


def _history(records: object) -> tuple[PassRecord, ...]:
    if not isinstance(records, list):
        raise FormatError("manifest: history: must be a list")
    result = []
    for index, record in enumerate(records):
        where = f"history entry #{index}"
        if not isinstance(record, dict) or not {"name", "config", "changed"} <= set(record) <= set(_HISTORY_TYPES):
            raise fail(where, f"must be an object with keys among {sorted(_HISTORY_TYPES)}")
        for key, value in record.items():
            if not isinstance(value, _HISTORY_TYPES[key]) or (key == "seconds" and isinstance(value, bool)):
                raise fail(where, f"{key} has the wrong type ({type(value).__name__})")
            if _HISTORY_TYPES[key] is list and not all(isinstance(v, str) for v in value):
                raise fail(where, f"{key} must list node or parameter names")
        result.append(PassRecord.from_dict(record))
    return tuple(result)
