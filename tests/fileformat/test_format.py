"""save / load: exact round trips, safety (no pickle, allow-lists), and damage always detected."""
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import fxcompress
from fxcompress.fileformat.container import HEADER_BYTES, VERSION, from_bytes, to_bytes
from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import FormatError
from fxcompress.layers import find_layers, insert_on_weight
from fxcompress.passes import InsertMasks, LowerToEncoded
from fxcompress.zoo import ZOO


def _sparse_fixed_point(gm, sparsity=0.9):
    """Mask and round every layer's weight with plain graph ops (a mul by a buffer, then round)."""
    for layer in find_layers(gm):
        w = gm.get_parameter(layer.weight).detach()
        owner, _, name = layer.weight.rpartition(".")
        keep = w.abs() > w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
        gm.get_submodule(owner).register_buffer(f"{name}_mask", keep.float())

        def build(graph, weight, mask=f"{layer.weight}_mask"):
            masked = graph.call_function(torch.mul, (weight, graph.get_attr(mask)))
            scaled = graph.call_function(torch.mul, (masked, 32.0))
            return graph.call_function(torch.mul, (graph.call_function(torch.round, (scaled,)), 1 / 32))
        insert_on_weight(gm, layer, build)
    gm.recompile()
    return gm


def _lowered(name, **kw):
    make_model, make_input = ZOO[name]
    x = make_input()
    gm = _sparse_fixed_point(fxcompress.compile(make_model().eval(), [], example_inputs=(x,)))
    return fxcompress.compile(gm, [LowerToEncoded(**kw)], example_inputs=(x,)), x


@pytest.fixture(scope="module")
def lowered():
    """`lowered(name)`: (lowered zoo model, its input), built once per module from seed 0 as each test
    would build it; the tests only save, serialize and run it, none changes it."""
    built = {}

    def get(name):
        if name not in built:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                built[name] = _lowered(name)
        return built[name]
    return get


@pytest.fixture(scope="module")
def lenet300_bytes(lowered):
    return to_bytes(lowered("lenet300")[0])


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_round_trips(tmp_path, name):
    make_model, make_input = ZOO[name]
    x = make_input()
    gm = fxcompress.compile(make_model().eval(), [], example_inputs=(x,))
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert torch.equal(loaded(x), gm(x))


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet", "transformer"])
def test_lowered_models_round_trip_with_history(tmp_path, name, lowered):
    gm, x = lowered(name)
    size = fxcompress.save(gm, tmp_path / "m.fxc")
    assert size == (tmp_path / "m.fxc").stat().st_size
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert torch.equal(loaded(x), gm(x))
    assert [r.name for r in fxcompress.history(loaded)] == ["LowerToEncoded"]
    assert set(dict(loaded.named_parameters())) == set(dict(gm.named_parameters()))
    assert set(dict(loaded.named_buffers())) == set(dict(gm.named_buffers()))


def test_file_size_is_the_encoded_bytes_plus_a_small_header(tmp_path, lowered):
    gm, _ = lowered("lenet300")
    payload = sum(m.payload.numel() for m in gm.modules() if isinstance(m, EncodedWeight))
    biases = sum(4 * p.numel() for n, p in gm.named_parameters() if n.endswith("bias"))
    size = fxcompress.save(gm, tmp_path / "m.fxc")
    headers = sum(m.storage_bytes()["header"] for m in gm.modules() if isinstance(m, EncodedWeight))
    assert payload + biases < size <= payload + biases + headers + 1024


def test_torch_save_of_a_lowered_model_still_works(tmp_path, lowered):
    gm, x = lowered("lenet5")
    torch.save(gm.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(v.dtype == torch.uint8 for k, v in state.items() if k.endswith("payload"))
    torch.save(gm, tmp_path / "whole.pt")  # the pickle route, for users who trust their files
    assert torch.equal(torch.load(tmp_path / "whole.pt", weights_only=False)(x), gm(x))


def test_every_single_byte_flip_is_detected():
    x = torch.randn(2, 12)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    gm = _sparse_fixed_point(fxcompress.compile(model, [], example_inputs=(x,)), sparsity=0.5)
    gm = fxcompress.compile(gm, [LowerToEncoded(coding="huffman", layout="relative")], example_inputs=(x,))
    data = bytearray(to_bytes(gm))
    expected = gm(x)
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF if i % 2 else 0x01
        try:
            out = from_bytes(bytes(flipped))(x)
        except FormatError:
            continue
        assert torch.equal(out, expected), f"byte {i} changed the outputs silently"


@pytest.mark.parametrize("cut", [0, 5, HEADER_BYTES, HEADER_BYTES + 10, -1])
def test_truncated_files_name_the_segment(cut, lenet300_bytes):
    data = lenet300_bytes
    with pytest.raises(FormatError, match="header|manifest|tensor"):
        from_bytes(data[:cut] if cut >= 0 else data[:-1])


def test_a_future_version_is_refused(lenet300_bytes):
    import zlib
    data = bytearray(lenet300_bytes)
    struct.pack_into("<H", data, 8, VERSION + 1)
    struct.pack_into("<I", data, 18, zlib.crc32(bytes(data[:18])))
    with pytest.raises(FormatError, match=f"header: format version {VERSION + 1}"):
        from_bytes(bytes(data))


def test_a_corrupted_segment_is_named(lenet300_bytes):
    data = bytearray(lenet300_bytes)
    data[-3] ^= 0x10  # inside the last tensor segment
    with pytest.raises(FormatError, match="tensor .*checksum"):
        from_bytes(bytes(data))


def test_a_graph_calling_something_unlisted_cannot_be_saved(tmp_path):
    def unlisted(x):
        return x

    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.call_function(unlisted, (out.args[0],))
    out.args = (node,)
    gm.recompile()
    with pytest.raises(FormatError, match="allow-list"):
        fxcompress.save(gm, tmp_path / "m.fxc")
    assert not list(tmp_path.iterdir())  # nothing half-written


@settings(max_examples=12, deadline=None)
@given(widths=st.lists(st.integers(1, 24), min_size=2, max_size=4), sparsity=st.floats(0, 0.99),
       coding=st.sampled_from(["auto", "fixed", "huffman", "rans"]), bias=st.sampled_from(["float32", "float16"]))
def test_random_models_save_and_load_to_identical_outputs(widths, sparsity, coding, bias):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    x = torch.randn(3, widths[0])
    gm = _sparse_fixed_point(fxcompress.compile(torch.nn.Sequential(*layers).eval(), [], example_inputs=(x,)),
                             sparsity)
    gm = fxcompress.compile(gm, [LowerToEncoded(coding=coding, bias=bias)], example_inputs=(x,))
    assert torch.equal(from_bytes(to_bytes(gm))(x), gm(x))


class _ShapeReader(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], -1)) * x.ndim


def test_tensor_property_reads_save_and_load(tmp_path):
    x = torch.randn(2, 3, 4)
    gm = fxcompress.compile(_ShapeReader().eval(), [], example_inputs=(x,))
    reads = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]
    assert reads == ["shape", "ndim"]  # what fx records for x.shape and x.ndim
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert torch.equal(loaded(x), gm(x))
    assert torch.equal(loaded(torch.ones(5, 12)), gm(torch.ones(5, 12)))  # the batch size is read, not stored


def test_getattr_of_anything_but_a_tensor_property_cannot_be_saved(tmp_path):
    gm = torch.fx.symbolic_trace(_ShapeReader().eval())
    read = next(n for n in gm.graph.nodes if n.target is getattr)
    read.args = (read.args[0], "grad_fn")
    gm.recompile()
    with pytest.raises(FormatError, match="tensor properties"):
        fxcompress.save(gm, tmp_path / "m.fxc")


class _TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        return self.fc(x) - y


def test_a_node_between_two_placeholders_saves_and_loads(tmp_path):
    """torch.fx lets a pass put a node before the second input (InsertFakeQuant did, quantizing a join's operand
    right after the first one); the file lists inputs first, so the model loads and keeps its input order."""
    gm = torch.fx.symbolic_trace(_TwoInputs().eval())
    x, y = gm.graph.find_nodes(op="placeholder")
    with gm.graph.inserting_after(x):
        doubled = gm.graph.call_function(torch.mul, (x, 2.0))
    fc = next(n for n in gm.graph.nodes if n.op == "call_module")
    fc.replace_input_with(x, doubled)
    gm.recompile()
    assert [n.op for n in gm.graph.nodes][:3] == ["placeholder", "call_function", "placeholder"]
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    a, b = torch.randn(2, 4), torch.randn(2, 3)
    assert torch.equal(loaded(a, b), gm(a, b))  # inputs of two shapes: swapped, they would not run


_DETERMINISM_SCRIPT = """
import torch, fxcompress
from fxcompress.passes import InsertMasks, InsertFakeQuant, LowerToEncoded
torch.manual_seed(0)
x = torch.randn(4, 24)
model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
passes = [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=5, method="kmeans"), LowerToEncoded()]
fxcompress.save(fxcompress.compile(model, passes, example_inputs=(x,)), PATH)
"""


# The other process then loads its own file (encoded), a masked LeNet-5 (mul, conv, pooling, linear, relu) and
# a transformer from the export front end (layer norm, attention, gelu, mean), which this process writes while
# the other one starts (READY appears once both are complete): load's dry run computes their common ops from
# tables, so a fresh process never imports torch._dynamo (about 2 s) to load a file.
_FRESH_LOAD_SCRIPT = """
import sys, time, pathlib
deadline = time.monotonic() + 240
while not pathlib.Path(READY).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
for path in (PATH, LENET5, TRANSFORMER):
    fxcompress.load(path)
assert "torch._dynamo" not in sys.modules, "loading a file imported torch._dynamo"
"""


# The other process imports with the cyclic collector off, then freezes what the imports made (it lives until
# the process exits): otherwise every full collection while it compiles, saves and loads walks torch's heap
# again (4.6 -> 3.4 s of CPU for the import and the save here). The collector runs, at its defaults, on
# everything made after.
_IMPORTS_WITHOUT_COLLECTIONS = """
import gc
gc.disable()
import torch, fxcompress
from fxcompress.passes import InsertMasks, InsertFakeQuant, LowerToEncoded
gc.enable()
gc.freeze()
"""


def _fresh_load_files(folder):
    for name, passes, frontend in (("lenet5", [InsertMasks(sparsity=0.5)], "auto"), ("transformer", [], "export")):
        make_model, make_input = ZOO[name]
        x = make_input()
        fxcompress.save(fxcompress.compile(make_model().eval(), passes, (x,), frontend=frontend), folder / name)
    (folder / "ready").touch()


def test_saving_is_byte_identical_across_processes(tmp_path):
    """The same model, seed and passes saved by another process and by this one: the same bytes; that process
    then loads files without importing torch._dynamo."""
    import subprocess
    import sys
    script = {name: _DETERMINISM_SCRIPT.replace("PATH", repr(str(tmp_path / name))) for name in ("here", "other")}
    script["other"] += _FRESH_LOAD_SCRIPT.replace("PATH", repr(str(tmp_path / "other"))).replace(
        "LENET5", repr(str(tmp_path / "lenet5"))).replace("TRANSFORMER", repr(str(tmp_path / "transformer"))).replace(
        "READY", repr(str(tmp_path / "ready")))
    other = subprocess.Popen([sys.executable, "-c", _IMPORTS_WITHOUT_COLLECTIONS + script["other"]])
    try:
        _fresh_load_files(tmp_path)  # meanwhile the files it loads, then the same steps in this process
        exec(script["here"], {})
    except BaseException:
        other.kill()  # it would wait for files that never come
        raise
    assert other.wait(timeout=300) == 0
    here, there = (tmp_path / "here").read_bytes(), (tmp_path / "other").read_bytes()
    assert here == there and len(here) > 1000
    records = fxcompress.history(from_bytes(here))
    assert [r.name for r in records] == ["InsertMasks", "InsertFakeQuant", "LowerToEncoded"]
    assert all(r.seconds == 0.0 for r in records)


# ---- what a module holds beyond its tensors: non-persistent buffers, a module under two paths ----------

class _Scaled(torch.nn.Module):
    """A buffer kept out of the state_dict (a constant the forward reads), on the root and on a layer."""
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.fc.register_buffer("offset", torch.full((4,), 0.5), persistent=False)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return (self.fc(x) + self.fc.offset) * self.scale


def test_non_persistent_buffers_stay_out_of_the_state_dict(tmp_path):
    gm = fxcompress.compile(_Scaled().eval(), [], example_inputs=(torch.randn(2, 4),))
    assert sorted(gm.state_dict()) == ["fc.bias", "fc.weight"]
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert sorted(loaded.state_dict()) == ["fc.bias", "fc.weight"]
    loaded.load_state_dict(gm.state_dict())  # strict: the keys are the saved model's
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), gm(x))


def test_a_module_held_under_two_paths_loads_as_one_module(tmp_path):
    shared = torch.nn.Linear(4, 4)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("b", (graph.call_function(torch.relu, (graph.call_module("a", (x,)),)),)))
    gm = torch.fx.GraphModule({"a": shared, "b": shared}, graph)
    fxcompress.save(gm, tmp_path / "m.fxc", example_inputs=(torch.randn(2, 4),))
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert loaded.a is loaded.b and loaded.a.weight is loaded.b.weight
    inputs = torch.randn(3, 4)
    assert torch.equal(loaded(inputs), gm(inputs))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fn])
def test_a_tensor_the_format_cannot_hold_is_refused_at_save_naming_it(tmp_path, dtype):
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    gm.register_buffer("extra", torch.ones(3).to(dtype))
    with pytest.raises(FormatError, match=r"cannot save tensor 'extra': dtype \w+ is not supported"):
        fxcompress.save(gm, tmp_path / "m.fxc")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


def test_a_saved_file_gets_the_mode_open_would_give_it_and_keeps_an_existing_ones(tmp_path):
    import os
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    old = os.umask(0o022)
    try:
        fxcompress.save(gm, tmp_path / "new.fxc")
        assert os.stat(tmp_path / "new.fxc").st_mode & 0o777 == 0o644
        (tmp_path / "old.fxc").touch()
        os.chmod(tmp_path / "old.fxc", 0o640)
        fxcompress.save(gm, tmp_path / "old.fxc")
        assert os.stat(tmp_path / "old.fxc").st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_a_version_2_file_still_loads(lenet300_bytes):
    """Version 3 added buffer kinds and aliases only: a file without them is the version 2 file."""
    data = bytearray(lenet300_bytes)
    struct.pack_into("<H", data, 8, 2)
    header_crc = zlib.crc32(bytes(data[:HEADER_BYTES - 4]))
    struct.pack_into("<I", data, HEADER_BYTES - 4, header_crc)
    x = ZOO["lenet300"][1]()
    assert torch.equal(from_bytes(bytes(data))(x), from_bytes(lenet300_bytes)(x))
