"""save streams each tensor's bytes to a temporary file beside the target and renames it when complete:
the bytes are those of the whole-buffer writer, no write holds more than one tensor, and a failure at
any point leaves the target as it was and no temporary file behind."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

import fxcompress
from fxcompress.fileformat import container
from fxcompress.fileformat.container import _HEADER, MAGIC, VERSION, _tensors, to_bytes
from fxcompress.fileformat.dryrun import record_inputs
from fxcompress.history import history
from fxcompress.fileformat.graphdata import graph_to_data, modules_to_data
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import ZOO


def _whole_buffer_bytes(gm):
    """The file as the writer before streaming built it: every segment's bytes joined in memory."""
    segments, table, offset, first = [], [], 0, {}
    for name, kind, tensor in _tensors(gm):
        if id(tensor) in first:
            table.append({"name": name, "same_as": first[id(tensor)]})
            continue
        first[id(tensor)] = name
        t = tensor.detach().cpu().contiguous()
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        table.append({"name": name, "kind": kind, "dtype": str(tensor.dtype).removeprefix("torch."),
                      "shape": list(tensor.shape), "offset": offset, "length": len(data),
                      "crc32": zlib.crc32(data), "requires_grad": bool(tensor.requires_grad)})
        segments.append(data)
        offset += len(data)
    manifest = {"graph": graph_to_data(gm), "modules": modules_to_data(gm), "tensors": table,
                "history": [r.as_dict() | {"seconds": 0.0} for r in history(gm)], "data_bytes": offset,
                "inputs": record_inputs(gm)}
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = _HEADER.pack(MAGIC, VERSION, len(packed), zlib.crc32(packed))
    return b"".join([header, struct.pack("<I", zlib.crc32(header)), packed, *segments])


@pytest.fixture(scope="module")
def lowered():
    make_model, make_input = ZOO["lenet5"]
    x = make_input()
    gm = fxcompress.compile(make_model().eval(), [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=5, method="kmeans")],
                            example_inputs=(x,))
    gm = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    gm.register_buffer("halves", torch.randn(3, 5).to(torch.bfloat16))  # every stored kind of bytes
    gm.register_buffer("flags", torch.tensor([True, False, True]))
    gm.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
    return gm, x


def test_streamed_file_is_byte_identical_to_the_whole_buffer_file(tmp_path, lowered):
    gm, _ = lowered
    size = fxcompress.save(gm, tmp_path / "m.fxc")
    expected = _whole_buffer_bytes(gm)
    assert (tmp_path / "m.fxc").read_bytes() == expected == to_bytes(gm)
    assert size == len(expected)


def test_each_write_holds_one_tensor_at_most(lowered):
    gm, _ = lowered

    class Spy:
        sizes = []

        def write(self, data):
            self.sizes.append(len(memoryview(data).cast("B")))
            return self.sizes[-1]
    total = container._write(gm, Spy(), True)
    stored = {id(t): t for _, _, t in _tensors(gm)}
    largest = max(t.numel() * t.element_size() for t in stored.values())
    assert len(Spy.sizes) == 1 + len(stored)  # the header and manifest, then one write per tensor
    assert max(Spy.sizes[1:]) == largest and sum(Spy.sizes) == total == len(to_bytes(gm))


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("at", [1, 4])
def test_a_failure_mid_save_leaves_the_old_file_and_no_temporary(tmp_path, lowered, monkeypatch, failure, at):
    gm, x = lowered
    target = tmp_path / "m.fxc"
    fxcompress.save(gm, target)
    before = target.read_bytes()
    raw, calls = container._raw, []

    def failing(tensor):  # the first pass sizes every tensor; fail in the second, after bytes were written
        calls.append(tensor)
        if len(calls) == len({id(t) for _, _, t in _tensors(gm)}) + at:
            raise failure("disk full")
        return raw(tensor)
    monkeypatch.setattr(container, "_raw", failing)
    with pytest.raises(failure, match="disk full"):
        fxcompress.save(gm, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.fxc"]
    monkeypatch.undo()
    assert torch.equal(fxcompress.load(target)(x), gm(x))


def test_a_failure_before_any_file_exists_leaves_nothing(tmp_path, lowered, monkeypatch):
    gm, _ = lowered
    monkeypatch.setattr(container.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        fxcompress.save(gm, tmp_path / "m.fxc")
    assert os.listdir(tmp_path) == []


def test_float_model_streams_without_copying_its_tensors(tmp_path):
    """A contiguous little-endian tensor is written from its own memory (the view shares it)."""
    weight = torch.randn(64, 64)
    view = container._raw(weight)
    assert np.frombuffer(view, np.uint8).ctypes.data == weight.data_ptr()
