"""Crafted encoded weights: any mutation of a real header or payload decodes to the declared shape
or raises FormatError, in bounded memory and time; each attack measured on earlier code is refused."""
import copy
import json
import resource
import struct
import time
import tracemalloc
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress.fileformat.container import HEADER_BYTES
from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.tensor import GroupSteps, encode_half, encode_tensor
from fxcompress.errors import FormatError

PATH = "fc1.weight_encoded"
MEMORY_LIMIT = 32 << 20  # bytes traced by tracemalloc while one crafted weight is checked and decoded
TIME_LIMIT = 5.0  # seconds for one crafted weight, on a slow shared machine


def _weight(kind: str, shape: tuple[int, ...], density: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "table":  # weight sharing: a few arbitrary centroids
        w = torch.randn(8, generator=g)[torch.randint(0, 8, shape, generator=g)]
    elif kind == "per_channel":  # a few levels per output channel, each channel its own scale
        w = torch.randint(-3, 4, shape, generator=g) * (torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) + 1)
    elif kind == "grid":  # fixed point
        w = torch.randint(-40, 40, shape, generator=g) / 16
    else:  # unshared floats: raw bit patterns
        w = torch.randn(shape, generator=g)
    return (w * (torch.rand(shape, generator=g) < density)).to(dtype)


def _corpus() -> list[tuple[dict, bytes]]:
    """(header, payload) of real encoded weights: every coding, layout and codebook kind."""
    found = []
    for i, kind in enumerate(["table", "per_channel", "grid", "float"]):
        for coding in ("fixed", "huffman", "rans"):
            for layout in ("dense", "relative"):
                shape = (40, 70) if coding == "rans" and kind == "table" else (12, 20)
                w = _weight(kind, shape, 0.3 if layout == "relative" else 0.8, i)
                found.append(EncodedWeight.from_encoded(encode_tensor(w, layouts=(layout,), codings=(coding,))))
    found.append(EncodedWeight.from_encoded(encode_tensor(_weight("table", (6, 3, 3, 3), 0.5, 7, torch.float64),
                                                          index_bits=2)))
    found.append(EncodedWeight.from_encoded(encode_tensor(_weight("grid", (16, 9), 0.5, 8, torch.bfloat16))))
    found.append(EncodedWeight.from_encoded(encode_half(torch.randn(10))))
    for i, (coding, layout) in enumerate((("rans", "dense"), ("huffman", "relative"), ("fixed", "dense"))):
        steps = torch.rand(8 * 4, generator=torch.Generator().manual_seed(i)) / 50 + 0.01  # group-wise grid
        w = _weight("grid", (8, 64), 0.5, 9 + i) * 16 * steps.repeat_interleave(16).reshape(8, 64)
        found.append(EncodedWeight.from_encoded(encode_tensor(w, layouts=(layout,), codings=(coding,),
                                                              groups=GroupSteps(steps.numpy(), 16))))
    for i, (coding, keep, block) in enumerate((("fixed", 2, 4), ("huffman", 1, 4), ("rans", 4, 8))):  # N:M
        w = _n_of_m(_weight("table" if i else "grid", (16, 24), 1.0, 12 + i), keep, block)
        found.append(EncodedWeight.from_encoded(encode_tensor(w, layouts=("pattern",), codings=(coding,))))
    return [(m.header, m.payload.numpy().tobytes()) for m in found]


def _n_of_m(w: torch.Tensor, keep: int, block: int) -> torch.Tensor:
    """w with all but the `keep` largest magnitudes of every run of `block` elements zeroed."""
    runs = w.reshape(-1, block)
    drop = runs.abs().argsort(dim=1)[:, :block - keep]
    return runs.scatter(1, drop, torch.zeros_like(runs[:, :block - keep])).reshape(w.shape)


CORPUS = _corpus()


def test_the_corpus_covers_every_coding_layout_and_codebook():
    headers = [h for h, _ in CORPUS]
    streams = [h["values"] for h in headers] + [h["positions"] for h in headers if h["positions"]]
    assert {s["coding"] for s in streams} == {"fixed", "huffman", "rans"}
    assert {h["layout"] for h in headers} == {"dense", "relative", "pattern"}
    assert {tuple(h["pattern"]) for h in headers if "pattern" in h} == {(2, 4), (1, 4), (4, 8)}
    assert {h["codebook"] for h in headers} == {"table", "table_per_channel", "grid", "group_grid", "float32",
                                                "float16"}
    assert {h.get("dtype", "float32") for h in headers} == {"float32", "float64", "bfloat16"}
    assert any(s.get("lanes", 1) > 1 for s in streams if s["coding"] == "huffman")
    assert any(s.get("lanes", 1) > 1 for s in streams if s["coding"] == "rans")


def attach(header: dict, payload: bytes, bits=None) -> EncodedWeight:
    """Rebuild an encoded weight as the loader does: built on the meta device, then given the bytes."""
    with torch.device("meta"):
        module = EncodedWeight(header=header, bits=bits)
    module.register_buffer("payload", torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()))
    return module


def outcome(header: dict, payload: bytes) -> str:
    """Check and decode a crafted weight; anything but FormatError or the declared tensor fails."""
    module = attach(header, payload)
    try:
        module.check_loaded(PATH)
    except FormatError as exc:
        assert str(exc).startswith(f"encoded weight {PATH}: ")
        return "refused by check_loaded"
    try:
        out = module()
    except FormatError as exc:
        assert str(exc).startswith(f"encoded weight {PATH}: ")
        return "refused when decoded"
    assert out.shape == tuple(header["shape"])
    assert out.dtype == getattr(torch, header.get("dtype", "float32"))
    return "decoded"


# --- mutations -------------------------------------------------------------------------------

def _leaves(value, path=()):
    """Paths to every scalar in a header (dict keys and list indices)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, path + (k,))] or [path]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, path + (i,))] or [path]
    return [path]


def _set(header, path, value):
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _get(header, path):
    for key in path:
        header = header[key]
    return header


NAMES = ["fixed", "huffman", "rans", "dense", "relative", "pattern", "table", "table_per_channel", "grid", "group_grid", "float16",
         "float32", "float64", "bfloat16", "int8", ""]
HUGE = [2 ** 16, 2 ** 16 + 1, 2 ** 31, 3 << 30, 2 ** 32, 10 ** 8, 10 ** 9, 2 ** 40, 2 ** 62, 2 ** 64, -(2 ** 63)]
ODD = [None, "7", 1.5, float("nan"), True, [], {}, [3, 4]]


@st.composite
def mutation(draw, header: dict, payload: bytes):
    kind = draw(st.sampled_from(["nudge", "set", "name", "odd", "delete", "add", "shape", "positions",
                                 "flip", "resize", "fill"]))
    leaves = [p for p in _leaves(header) if p]
    if kind in ("nudge", "set", "name", "odd") and leaves:
        path = draw(st.sampled_from(leaves))
        old = _get(header, path)
        choices = {"nudge": st.integers(-3, 3).map(lambda d: old + d if type(old) is int else d),
                   "set": st.one_of(st.integers(-2, 70000), st.sampled_from(HUGE)),
                   "name": st.sampled_from(NAMES), "odd": st.sampled_from(ODD)}
        return (kind, path, draw(choices[kind]))
    if kind in ("delete", "add"):
        where = draw(st.sampled_from([()] + [(k,) for k in ("values", "positions") if isinstance(header.get(k), dict)]))
        keys = list(_get(header, where))
        return (kind, where, draw(st.sampled_from(keys)) if kind == "delete" and keys else "extra")
    if kind == "shape":
        return (kind, draw(st.sampled_from(["reverse", "flatten", "add_dim", "drop_dim", "grow", "shrink"])))
    if kind == "positions":
        return (kind, draw(st.sampled_from(["none", "copy_values"])))
    at = draw(st.integers(0, max(len(payload) - 1, 0)))
    if kind == "flip":
        return (kind, at, draw(st.integers(1, 255)))
    if kind == "resize":
        return (kind, draw(st.integers(-8, 8)))
    return (kind, at, draw(st.integers(1, 64)), draw(st.sampled_from([0, 255])))


def apply(header: dict, payload: bytearray, change: tuple) -> None:
    kind = change[0]
    if kind in ("nudge", "set", "name", "odd"):
        _set(header, change[1], copy.deepcopy(change[2]))
    elif kind == "delete":
        _get(header, change[1]).pop(change[2], None)
    elif kind == "add":
        _get(header, change[1])[change[2]] = 1
    elif kind == "shape" and isinstance(header.get("shape"), list) and header["shape"] and \
            all(type(d) is int for d in header["shape"]):
        shape = header["shape"]
        numel = int(np.prod(shape))
        header["shape"] = {"reverse": shape[::-1], "flatten": [numel], "add_dim": shape + [1],
                           "drop_dim": shape[:-1], "grow": [shape[0] * 2] + shape[1:],
                           "shrink": [max(shape[0] // 2, 1)] + shape[1:]}[change[1]]
    elif kind == "positions":
        header["positions"] = None if change[1] == "none" else copy.deepcopy(header.get("values"))
    elif kind == "flip" and payload:
        payload[change[1]] ^= change[2]
    elif kind == "resize":
        del payload[max(len(payload) + change[1], 0):]
        payload.extend(b"\x5a" * max(change[1], 0))
    elif kind == "fill":
        payload[change[1]:change[1] + change[2]] = bytes([change[3]]) * len(payload[change[1]:change[1] + change[2]])


@st.composite
def crafted(draw):
    header, payload = draw(st.sampled_from(CORPUS))
    header, payload = copy.deepcopy(header), bytearray(payload)
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        changes.append(draw(mutation(header, bytes(payload))))
        apply(header, payload, changes[-1])
    return header, bytes(payload), changes


def test_every_crafted_weight_decodes_or_raises_format_error(capsys):
    outcomes, kinds, worst = Counter(), Counter(), {"memory": 0, "seconds": 0.0}

    @settings(max_examples=settings().max_examples * 5)
    @given(crafted())
    def run(case):
        header, payload, changes = case
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        start = time.perf_counter()
        try:
            result = outcome(header, payload)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        seconds = time.perf_counter() - start
        rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # torch's tensors, untraced
        assert peak <= MEMORY_LIMIT, (peak, changes)
        assert rss_growth <= MEMORY_LIMIT >> 10, (rss_growth, changes)
        assert seconds <= TIME_LIMIT, (seconds, changes)
        outcomes[result] += 1
        kinds.update(c[0] for c in changes)
        worst["memory"], worst["seconds"] = max(worst["memory"], peak), max(worst["seconds"], seconds)
        worst["rss_kib"] = max(worst.get("rss_kib", 0), rss_growth)

    run()
    with capsys.disabled():
        print(f"\ncrafted encoded weights: {sum(outcomes.values())} cases, outcomes {dict(outcomes)}, "
              f"mutations {dict(kinds)}, peak traced memory {worst['memory'] / 2 ** 20:.2f} MiB, "
              f"slowest {worst['seconds'] * 1000:.1f} ms, peak RSS growth during one case {worst['rss_kib']} KiB")
    assert outcomes["refused by check_loaded"] and outcomes["decoded"]  # both sides were exercised


def test_the_unmutated_corpus_passes_check_loaded_and_decodes():
    assert {outcome(copy.deepcopy(h), p) for h, p in CORPUS} == {"decoded"}


# --- the attacks measured on earlier code, one by one ----------------------------------------------

def _lowered_linear(coding: str = "huffman", layout: str = "dense") -> tuple[dict, bytes]:
    w = _weight("table", (30, 20), 0.3, 11)
    module = EncodedWeight.from_encoded(encode_tensor(w, layouts=(layout,), codings=(coding,)))
    return copy.deepcopy(module.header), module.payload.numpy().tobytes()


def _refused(header: dict, payload: bytes, match: str, root: nn.Module | None = None) -> None:
    module = attach(header, payload)
    with pytest.raises(FormatError, match=f"^encoded weight {PATH}: {match}"):
        module.check_loaded(PATH, root)


def test_a_declared_payload_size_allocates_nothing():
    header, payload = _lowered_linear()
    header["values"]["payload_bytes"] = 3 << 30
    assert EncodedWeight(header).payload.numel() == 0  # built on the CPU: the header sized nothing
    _refused(header, payload, r"values stream: field 'payload_bytes' is 3221225472")


def test_a_huge_huffman_alphabet_is_refused_before_any_table_is_built():
    header, payload = _lowered_linear("huffman")
    header["values"]["alphabet"] = 10 ** 8
    _refused(header, payload, r"values stream: field 'alphabet' is 100000000, expected an integer in \[1, 65536\]")


@pytest.mark.parametrize("coding", ["huffman", "rans"])
def test_a_huge_lane_count_is_a_format_error(coding):
    header, payload = _lowered_linear(coding)
    header["values"]["lanes"] = 10 ** 9
    _refused(header, payload, rf"values stream: {10 ** 9} lanes for {header['values']['count']} symbols")


def test_huffman_lengths_all_zero_are_not_a_code():
    header, payload = _lowered_linear("huffman")
    lengths = (header["values"]["alphabet"] * 5 + 7) // 8
    start = header["codebook_bytes"]
    payload = payload[:start] + bytes(lengths) + payload[start + lengths:]
    _refused(header, payload, "values stream: Huffman code lengths do not form a complete prefix code")


def test_rans_frequencies_must_sum_to_a_power_of_two():
    header, payload = _lowered_linear("rans")
    start = header["codebook_bytes"]
    payload = payload[:start] + bytes([payload[start] ^ 0x80]) + payload[start + 1:]
    _refused(header, payload, "values stream: rANS frequencies sum to")


def test_a_swapped_shape_does_not_fit_the_layer():
    header, payload = _lowered_linear()
    header["shape"] = header["shape"][::-1]
    attach(header, payload).check_loaded(PATH)  # consistent with its own bytes ...
    root = nn.Module()
    root.fc1 = nn.Linear(20, 30)
    _refused(header, payload, r"header: shape \[20, 30\] does not fit layer fc1 \(Linear\), which needs \[30, 20\]",
             root)  # ... but not with the layer it feeds


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["values"].update(count=599), "values stream: 599 symbols for 600 elements"),
    (lambda h: h.update(codebook_bytes=0), "header: codebook and streams describe"),
    (lambda h: h["values"].update(payload_bytes=301),
     r"values stream: field 'payload_bytes' is 301, expected an integer in \[0, 300\]"),
    (lambda h: h["values"].update(alphabet=h["codebook_bytes"] // 4 + 1),
     "values stream: alphabet .* is larger than the codebook"),
    (lambda h: h.update(shape=[30, 20, 2]), "values stream: 600 symbols for 1200 elements"),
    (lambda h: h.update(shape=[-30, -20]), r"header: shape \[-30, -20\]"),
    (lambda h: h.update(dtype="int8"), "header: dtype 'int8'"),
    (lambda h: h.update(layout="relative"), "header: a positions stream goes with the relative layout"),
    (lambda h: h.update(offset=3), "header: offset 3 is only for grid codebooks"),
])
def test_inconsistent_headers_name_the_part(edit, match):
    header, payload = _lowered_linear("fixed")
    assert header["codebook"] == "table" and header["values"]["payload_bytes"] == 300
    edit(header)
    _refused(header, payload, match)


def test_a_single_symbol_stream_cannot_claim_unbounded_symbols():
    module = EncodedWeight.from_encoded(encode_tensor(torch.zeros(40, 30), layouts=("dense",), codings=("fixed",)))
    header, payload = copy.deepcopy(module.header), module.payload.numpy().tobytes()
    assert header["values"]["width"] == 0 and header["values"]["payload_bytes"] == 0
    header["shape"], header["values"]["count"] = [10 ** 6, 1000], 10 ** 9
    _refused(header, payload, f"values stream: {10 ** 9} symbols on 0 bits")


def test_a_relative_tensor_cannot_be_larger_than_its_positions_reach():
    header, payload = _lowered_linear("fixed", "relative")
    header["shape"] = [30 * 1000, 20]
    _refused(header, payload, "positions stream: .* codes cannot reach element 599999")


def test_a_relative_tensor_cannot_have_more_position_codes_than_elements():
    w = _weight("table", (30, 20), 0.3, 11)
    module = EncodedWeight.from_encoded(encode_tensor(w, layouts=("relative",), codings=("fixed",), index_bits=1))
    header, payload = copy.deepcopy(module.header), module.payload.numpy().tobytes()
    assert header["positions"]["count"] == 600  # 1-bit indices: every zero is a filler
    header["shape"] = [599]
    _refused(header, payload, "positions stream: 600 codes for 599 elements")


def test_bad_bits_and_a_missing_payload_are_refused():
    header, payload = _lowered_linear()
    module = attach(header, payload, bits=10 ** 9)
    with pytest.raises(FormatError, match=f"encoded weight {PATH}: bits 1000000000"):
        module.check_loaded(PATH)
    with torch.device("meta"):
        unloaded = EncodedWeight(header)
    with pytest.raises(FormatError, match="payload buffer"):
        unloaded.check_loaded(PATH)


# --- through fxcompress.save / fxcompress.load --------------------------------------------------

class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 30), nn.Linear(30, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def saved_file(tmp_path_factory) -> bytes:
    from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
    x = torch.randn(2, 40)
    gm = fxcompress.compile(TwoLayers().eval(), [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans"),
                                                 LowerToEncoded(coding="huffman")], example_inputs=(x,))
    path = tmp_path_factory.mktemp("saved") / "model.fxc"
    fxcompress.save(gm, path)
    assert torch.equal(fxcompress.load(path)(x), gm(x))  # the untouched file loads
    return path.read_bytes()


def _with_header(data: bytes, path: str, edit) -> bytes:
    """The file with the encoded header of module `path` edited, every checksum recomputed."""
    magic, version, length, _ = struct.unpack_from("<8sHII", data)
    manifest = json.loads(zlib.decompress(data[HEADER_BYTES:HEADER_BYTES + length]))
    edit(next(m for m in manifest["modules"] if m["path"] == path)["config"]["header"])
    packed = zlib.compress(json.dumps(manifest).encode())
    head = struct.pack("<8sHII", magic, version, len(packed), zlib.crc32(packed))
    return head + struct.pack("<I", zlib.crc32(head)) + packed + data[HEADER_BYTES + length:]


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["values"].update(payload_bytes=3 << 30), "values stream: field 'payload_bytes'"),
    (lambda h: h["values"].update(alphabet=10 ** 8), "values stream: field 'alphabet'"),
    (lambda h: h["values"].update(lanes=10 ** 9), "values stream: 1000000000 lanes"),
    (lambda h: h.update(shape=h["shape"][::-1]), r"header: shape \[40, 30\] does not fit layer fc1"),
])
def test_load_refuses_crafted_headers_naming_the_weight(saved_file, tmp_path, edit, match):
    (tmp_path / "crafted.fxc").write_bytes(_with_header(saved_file, PATH, edit))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match=f"encoded weight {PATH}: {match}"):
        fxcompress.load(tmp_path / "crafted.fxc")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: nothing near 3 GiB


# --- the pattern layout's header field -------------------------------------------------------------

def _two_of_four(coding: str = "fixed") -> tuple[dict, bytes]:
    w = _n_of_m(_weight("table", (30, 20), 1.0, 11), 2, 4)
    module = EncodedWeight.from_encoded(encode_tensor(w, layouts=("pattern",), codings=(coding,)))
    assert module.header["pattern"] == [2, 4] and module.header["positions"]["count"] == 150
    return copy.deepcopy(module.header), module.payload.numpy().tobytes()


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(pattern=[2, 8]), r"positions stream: alphabet 6 for 2:8 patterns \(expected 28\)"),
    (lambda h: h.update(pattern=[4, 4]), r"header: pattern \[4, 4\] is not \[n, m\] with 1 <= n < m <= 16"),
    (lambda h: h.update(pattern=[0, 4]), r"header: pattern \[0, 4\] is not"),
    (lambda h: h.update(pattern=[8, 17]), r"header: pattern \[8, 17\] is not"),
    (lambda h: h.update(pattern=[2, 2 ** 40]), r"header: pattern \[2, 1099511627776\] is not"),
    (lambda h: h.update(pattern=[2.0, 4]), r"header: pattern \[2.0, 4\] is not"),
    (lambda h: h.update(pattern=[2, 4, 1]), r"header: pattern \[2, 4, 1\] is not"),
    (lambda h: h.update(pattern="2:4"), "header: pattern '2:4' is not"),
    (lambda h: h.pop("pattern"), "header: pattern goes with the pattern layout, and only with it"),
    (lambda h: h.update(layout="relative"), r"header: field 'index_bits' is 0, expected an integer in \[1, 16\]"),
    (lambda h: h.update(layout="relative", index_bits=5), "header: pattern goes with the pattern layout, and only"),
    (lambda h: h.update(shape=[30, 21]), "header: pattern blocks of 4 do not divide the 630 elements"),
    (lambda h: h.update(shape=[60, 20]), "positions stream: 150 patterns for 300 blocks of 4"),
    (lambda h: h.update(shape=[10 ** 6, 20]), "positions stream: 150 patterns for 5000000 blocks of 4"),
    (lambda h: h["values"].update(count=299), "values stream: 299 symbols for 150 blocks of 2 values"),
    (lambda h: h.update(positions=None), "header: a positions stream goes with the relative layout or the pattern"),
])
def test_inconsistent_pattern_headers_name_the_part(edit, match):
    header, payload = _two_of_four()
    edit(header)
    _refused(header, payload, match)


def test_a_pattern_header_on_a_dense_weight_is_refused():
    header, payload = _lowered_linear("fixed")
    header["pattern"] = [2, 4]
    _refused(header, payload, "header: pattern goes with the pattern layout, and only with it")
