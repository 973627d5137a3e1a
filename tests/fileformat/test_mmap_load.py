"""load(path, mmap=True): the file is mapped copy-on-write; encoded payloads stay in the mapped pages and
decode on first use; every check of a plain load holds, with the same message."""
import ctypes
import struct

import pytest
import torch

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import FormatError
from fxcompress.fileformat.container import HEADER_BYTES
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import ZOO

from .hostile import read_manifest, with_manifest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    make_model, make_input = ZOO["transformer"]
    x = make_input()
    gm = fxcompress.compile(make_model().eval(), [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,))
    gm = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    path = tmp_path_factory.mktemp("mmap") / "m.fxc"
    fxcompress.save(gm, path)
    return gm, x, path


def test_mapped_model_computes_what_the_read_model_does(saved):
    gm, x, path = saved
    mapped, read = fxcompress.load(path, mmap=True), fxcompress.load(path)
    assert torch.equal(mapped(x), read(x)) and torch.equal(mapped(x), gm(x))
    assert [r.name for r in fxcompress.history(mapped)] == [r.name for r in fxcompress.history(gm)]


def _payload_bases(loaded, data):
    """For every encoded weight, its payload's address minus the file offset of its segment."""
    start = HEADER_BYTES + struct.unpack_from("<I", data, 10)[0]
    offsets = {e["name"]: e["offset"] for e in read_manifest(data)["tensors"] if "offset" in e}
    return {path: m.payload.data_ptr() - (start + offsets[f"{path}.payload"])
            for path, m in loaded.named_modules() if isinstance(m, EncodedWeight)}


def test_payloads_are_the_mapped_file_and_decode_on_first_use(saved):
    gm, x, path = saved
    data = path.read_bytes()
    loaded = fxcompress.load(path, mmap=True)
    encoded = [m for m in loaded.modules() if isinstance(m, EncodedWeight)]
    assert len(encoded) > 1 and all(m._dense is None for m in encoded)  # nothing decoded at load
    bases = _payload_bases(loaded, data)
    assert len(set(bases.values())) == 1  # every payload at its file offset in one mapping: no copies
    base = bases.popitem()[1]
    for module in encoded:
        view = (ctypes.c_ubyte * module.payload.numel()).from_address(module.payload.data_ptr())
        offset = module.payload.data_ptr() - base
        assert bytes(view) == data[offset:offset + module.payload.numel()]
    assert len(set(_payload_bases(fxcompress.load(path), data).values())) > 1  # a plain load copies
    assert torch.equal(loaded(x), gm(x))
    assert all(m._dense is not None for m in encoded)


def test_changing_a_mapped_tensor_never_changes_the_file(saved, tmp_path):
    gm, x, path = saved
    copy = tmp_path / "copy.fxc"
    copy.write_bytes(path.read_bytes())
    loaded = fxcompress.load(copy, mmap=True)
    for tensor in [*loaded.parameters(), *loaded.buffers()]:
        with torch.no_grad():
            tensor.zero_() if tensor.is_floating_point() else tensor.fill_(1)
    assert copy.read_bytes() == path.read_bytes()
    assert torch.equal(fxcompress.load(copy, mmap=True)(x), gm(x))


def _flip(data, offset):
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


def _damaged(data):
    manifest = read_manifest(data)
    big = dict(manifest, data_bytes=manifest["data_bytes"] + (1 << 40))
    return {"empty": b"", "short header": data[:HEADER_BYTES - 3], "truncated": data[:-5],
            "trailing bytes": data + b"\0", "segment bit flip": _flip(data, len(data) - 3),
            "header bit flip": _flip(data, 9), "huge declared size": with_manifest(data, big),
            "manifest bit flip": _flip(data, HEADER_BYTES + 4)}


@pytest.mark.parametrize("case", ["empty", "short header", "truncated", "trailing bytes", "segment bit flip",
                                  "header bit flip", "huge declared size", "manifest bit flip"])
def test_damaged_files_are_refused_when_mapped_as_when_read(saved, tmp_path, case):
    _, _, path = saved
    bad = tmp_path / "bad.fxc"
    bad.write_bytes(_damaged(path.read_bytes())[case])
    with pytest.raises(FormatError) as read:
        fxcompress.load(bad)
    with pytest.raises(FormatError) as mapped:
        fxcompress.load(bad, mmap=True)
    assert str(mapped.value) == str(read.value)


def test_a_hostile_payload_header_is_refused_before_decoding_when_mapped(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    manifest = read_manifest(data)
    module = next(m for m in manifest["modules"] if m["type"].endswith(".EncodedWeight"))
    module["config"]["header"]["shape"] = [1 << 30, 1 << 30]  # a tensor its payload cannot describe
    bad = tmp_path / "bad.fxc"
    bad.write_bytes(with_manifest(data, manifest))
    with pytest.raises(FormatError, match="encoded weight"):
        fxcompress.load(bad, mmap=True)
