"""LowerToEncoded: bit-identical outputs, stable names, exact bytes, decode() back to dense."""
import copy

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import ConfigError
from fxcompress.layers import WeightTransform, find_layers, insert_on_weight
from fxcompress.passes import LowerToEncoded
from fxcompress.zoo import ZOO, LeNet5, LeNet300100


class RoundToGrid(WeightTransform):
    """A stand-in fake-quant: rounds the weight to multiples of `step` (a fixed-point code)."""

    def __init__(self, step: float, bits: int) -> None:
        super().__init__()
        self.step, self.bits = step, bits

    def forward(self, w):
        return torch.round(w / self.step) * self.step


def hand_compressed(model, inputs, sparsity=0.9, step=2 ** -6):
    """Magnitude mask (a buffer and a mul node) + rounding on every layer's weight chain."""
    gm = fxcompress.compile(model, [], example_inputs=inputs)
    for i, layer in enumerate(find_layers(gm)):
        w = gm.get_parameter(layer.weight).detach()
        keep = w.abs() > w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values
        owner, _, name = layer.weight.rpartition(".")
        gm.get_submodule(owner).register_buffer(f"{name}_mask", keep.float())
        gm.add_module(f"quant{i}", RoundToGrid(step, 6))

        def build(graph, weight, layer=layer, i=i, mask=f"{layer.weight}_mask"):
            masked = graph.call_function(torch.mul, (weight, graph.get_attr(mask)))
            return graph.call_module(f"quant{i}", (masked,))
        insert_on_weight(gm, layer, build)
    gm.recompile()
    return gm


IN_FEATURES = 14 * 14


@pytest.fixture(scope="module")
def lenet():
    """Built once for the module (no test changes it: compile and decode copy it). A 196-300-100-10
    LeNet (14x14 inputs): what these tests check does not depend on the input width, and each of
    the dozen lowerings below encodes a quarter of LeNet-300-100's weights."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 14, 14)
    return hand_compressed(LeNet300100(in_features=IN_FEATURES).eval(), (x,)), x


@pytest.fixture(scope="module")
def lowered_lenet(lenet):
    """`lowered_lenet(**config)`: the lenet lowered by LowerToEncoded(**config), each configuration
    lowered once for the module (tests only read the lowered models; decode copies)."""
    gm, x = lenet
    cache = {}

    def lowered(**config):
        key = tuple(sorted(config.items()))
        if key not in cache:
            cache[key] = fxcompress.compile(gm, [LowerToEncoded(**config)], example_inputs=(x,))
        return cache[key]
    return lowered


def test_outputs_are_bit_identical_and_names_stable(lenet, lowered_lenet):
    gm, x = lenet
    lowered = lowered_lenet()
    assert torch.equal(lowered(x), gm(x))
    assert [l.name for l in find_layers(lowered)] == ["fc1", "fc2", "fc3"]
    encoded = [n.target for n in lowered.graph.nodes
               if n.op == "call_module" and isinstance(lowered.get_submodule(n.target), EncodedWeight)]
    assert encoded == ["fc1.weight_encoded", "fc2.weight_encoded", "fc3.weight_encoded"]
    names = dict(lowered.named_parameters()) | dict(lowered.named_buffers())
    assert "fc1.weight" not in names and "fc1.weight_mask" not in names
    assert all(not isinstance(m, RoundToGrid) for m in lowered.modules())
    assert all(lowered.get_submodule(t).bits == 6 for t in encoded)


@pytest.mark.parametrize("coding", ["fixed", "huffman", "rans"])
@pytest.mark.parametrize("layout", ["dense", "relative"])
def test_every_forced_coding_is_exact(lenet, lowered_lenet, coding, layout):
    gm, x = lenet
    lowered = lowered_lenet(coding=coding, layout=layout)
    assert torch.equal(lowered(x), gm(x))
    stats = fxcompress.history(lowered)[-1].stats
    assert {s["values"] for s in stats.values()} <= {coding, "fixed"}  # a one-symbol stream is free as fixed
    assert {s["layout"] for s in stats.values()} == {layout}


def test_auto_is_no_larger_than_any_forced_choice(lowered_lenet):
    def size(**kw):
        low = lowered_lenet(**kw)
        return sum(sum(m.storage_bytes().values()) for m in low.modules() if isinstance(m, EncodedWeight))
    auto = size()
    assert all(auto <= size(coding=c) for c in ("fixed", "huffman", "rans"))


def test_conv_layers_and_deep_compression_index_widths():
    x = torch.randn(2, 1, 28, 28)
    gm = hand_compressed(LeNet5().eval(), (x,), sparsity=0.97)
    lowered = fxcompress.compile(gm, [LowerToEncoded(layout="relative")], example_inputs=(x,))
    assert torch.equal(lowered(x), gm(x))
    assert lowered.get_submodule("conv1.weight_encoded").header["index_bits"] == 8
    assert lowered.get_submodule("fc1.weight_encoded").header["index_bits"] == 5


def test_float16_biases(lenet, lowered_lenet):
    gm, x = lenet
    lowered = lowered_lenet(bias="float16")
    assert isinstance(lowered.get_submodule("fc1.bias_encoded"), EncodedWeight)
    assert torch.equal(lowered.get_submodule("fc1.bias_encoded")(), gm.fc1.bias.detach().half().float())
    assert torch.allclose(lowered(x), gm(x), atol=1e-2)
    row = next(r for r in fxcompress.summary(lowered).rows if r["layer"] == "fc1")
    encoded_bias = lowered.get_submodule("fc1.bias_encoded")
    assert row["bytes_bias"] == sum(encoded_bias.storage_bytes().values()) < 4 * 300  # the summary sees fp16
    assert row["params"] == 300 * IN_FEATURES + 300


def test_decode_gives_a_plain_dense_module(lenet, lowered_lenet):
    gm, x = lenet
    lowered = lowered_lenet(bias="float16")
    dense = fxcompress.decode(lowered)
    assert not any(isinstance(m, WeightTransform) for m in dense.modules())
    assert {n.op for n in dense.graph.nodes} <= {"placeholder", "get_attr", "call_function", "output"}
    assert torch.equal(dense(x), lowered(x))
    assert isinstance(dense.fc1.weight, nn.Parameter) and dense.fc1.weight.shape == (300, IN_FEATURES)
    assert torch.equal(fxcompress.decode(gm)(x), gm(x))  # masks and fake-quant fold as well


def test_summary_bytes_are_exact(lowered_lenet):
    lowered = lowered_lenet()
    rows = {r["layer"]: r for r in fxcompress.summary(lowered).rows}
    for name in ("fc1", "fc2", "fc3"):
        module = lowered.get_submodule(f"{name}.weight_encoded")
        assert rows[name]["exact"] == "yes"
        bias = lowered.get_parameter(f"{name}.bias")
        assert rows[name]["bytes_bias"] == 4 * bias.numel()  # kept fp32
        assert rows[name]["compressed_bytes"] == sum(module.storage_bytes().values()) + rows[name]["bytes_bias"]
        assert rows[name]["bytes_codebook"] + rows[name]["bytes_indices"] + rows[name]["bytes_positions"] \
            == module.payload.numel()


def test_layers_without_a_chain_are_left_alone():
    x = torch.randn(2, 1, 28, 28)
    gm = fxcompress.compile(LeNet300100().eval(), [LowerToEncoded()], example_inputs=(x,))
    assert not fxcompress.history(gm)[-1].changed
    assert isinstance(gm.fc1.weight, nn.Parameter)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_lower_exactly(name):
    make_model, make_input = ZOO[name]
    x = make_input()
    gm = hand_compressed(make_model().eval(), (x,), sparsity=0.8)
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    assert torch.equal(lowered(x), gm(x))
    record = fxcompress.history(lowered)[-1]  # the default configuration encodes every layer of every zoo model
    assert record.changed and set(record.params_touched) == {layer.weight for layer in find_layers(gm)}


@pytest.mark.parametrize("field,value", [("coding", "zip"), ("layout", "csr"), ("index_bits", 0),
                                         ("index_bits", 17), ("index_bits", 4.5), ("bias", "int8")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"LowerToEncoded.{field}"):
        LowerToEncoded(**{field: value})


@pytest.mark.parametrize("quant", [dict(method="kmeans", bits=5), dict(method="kmeans", bits=4, per_channel=True),
                                   dict(method="linear", bits=6, per_channel=True),
                                   dict(method="fixed_point", bits=8)])
def test_the_deep_compression_passes_lower_bit_identically(quant):
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    x = torch.randn(4, 1, 28, 28)
    gm = fxcompress.compile(LeNet5().eval(), [InsertMasks(sparsity=0.9, scope="global"), InsertFakeQuant(**quant)],
                            example_inputs=(x,))
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    assert torch.equal(lowered(x), gm(x))
    for layer in find_layers(lowered):
        module = lowered.get_submodule(f"{layer.name}.weight_encoded")
        assert module.bits == quant["bits"]
    dense = 4 * sum(p.numel() for p in LeNet5().parameters() if p.dim() > 1)
    encoded = sum(m.payload.numel() for m in lowered.modules() if isinstance(m, EncodedWeight))
    assert dense / encoded > 32 / (quant["bits"] + 5) * 5  # sparse and quantized: far below fp32


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_float_dtype_lowers_saves_and_loads_exactly(tmp_path, dtype):
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    x = torch.randn(4, 3, 4, 4, dtype=dtype)
    gm = fxcompress.compile(small_mlp().to(dtype),
                            [InsertMasks(sparsity=0.8, scope="global"), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,))
    lowered = fxcompress.compile(gm, [LowerToEncoded(coding="auto")], example_inputs=(x,))
    modules = [m for m in lowered.modules() if isinstance(m, EncodedWeight)]
    assert len(modules) == 2 and all(m().dtype == dtype for m in modules)
    assert all(m.header.get("dtype", "float32") == str(dtype).removeprefix("torch.") for m in modules)
    expected = gm(x)
    assert expected.dtype == dtype and torch.equal(lowered(x), expected)
    fxcompress.save(lowered, tmp_path / "model.fxc")
    loaded = fxcompress.load(tmp_path / "model.fxc")
    assert torch.equal(loaded(x), expected)


def test_float16_biases_keep_a_float64_models_dtype():
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    gm = hand_compressed(small_mlp().double(), (x,))
    lowered = fxcompress.compile(gm, [LowerToEncoded(bias="float16")], example_inputs=(x,))
    bias = lowered.get_submodule("1.bias_encoded")()
    assert bias.dtype == torch.float64
    assert torch.equal(bias, gm.get_submodule("1").bias.detach().half().double())


def test_an_integer_weight_is_refused_naming_the_layer():
    from fxcompress.errors import PreconditionError
    gm = fxcompress.compile(LeNet300100().eval(), [], example_inputs=(torch.randn(1, 1, 28, 28),))
    gm.fc1.weight = nn.Parameter(torch.zeros(300, 784, dtype=torch.int32), requires_grad=False)
    layer = next(layer for layer in find_layers(gm) if layer.name == "fc1")
    with pytest.raises(PreconditionError, match="fc1"):
        LowerToEncoded()._encode_weight(gm, layer)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_lowered_model_converted_after_lowering_computes_as_the_converted_masked_model(tmp_path, dtype):
    """`model.double()` / `.half()` converts float parameters; an encoded weight is bytes, which it left as they
    were, so every layer raised torch's dtype mismatch where the masked model, converted, ran."""
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    x = torch.randn(4, 3, 4, 4)
    gm = fxcompress.compile(small_mlp(), [InsertMasks(sparsity=0.8, scope="global"),
                                          InsertFakeQuant(bits=4, method="kmeans")], example_inputs=(x,))
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    before = {name: m().clone() for name, m in lowered.named_modules() if isinstance(m, EncodedWeight)}
    lowered.to(dtype)
    expected = copy.deepcopy(gm).to(dtype)(x.to(dtype))
    assert torch.equal(lowered(x.to(dtype)), expected)  # the same weights, converted as the masked model's were
    fxcompress.save(lowered, tmp_path / "model.fxc")  # the conversion is part of the file
    assert torch.equal(fxcompress.load(tmp_path / "model.fxc")(x.to(dtype)), expected)
    # and back: the bytes never changed, so the encoded tensors' own float32 values come back exactly
    lowered.float()
    assert all(m.dtype is None and torch.equal(m(), before[name]) for name, m in lowered.named_modules()
               if isinstance(m, EncodedWeight))
