import copy

import pytest
import torch

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import ConfigError
from fxcompress.kernels import SparseLayer, remeasure
from fxcompress.kernels.sparse import relative_available
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded, LowerToSparse
from fxcompress.zoo import LeNet5, LeNet300100

FAST = {"repeats": 2}
C_KERNELS = ("c_relative", "c_relative_csc") if relative_available() else ()  # where a C compiler builds our kernel


def _masked(model, x, sparsity=0.9):
    return fxcompress.compile(model.eval(), [InsertMasks(sparsity=sparsity, scope="global")], example_inputs=(x,))


@pytest.fixture(scope="module")
def masked_lenet300():
    """(x, LeNet-300-100 masked at 90% on x): built once for the module; tests only read it (compile copies)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    return x, _masked(LeNet300100(), x)


@pytest.fixture(scope="module")
def masked_lenet300_one_row():
    """{shared: LeNet-300-100 masked at 90% on one row, then 5-bit k-means when shared}, with the row:
    built once for the module; tests only read them (compile copies)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    masked = _masked(LeNet300100(), x)
    return x, {False: masked, True: fxcompress.compile(masked, [InsertFakeQuant(bits=5, method="kmeans")],
                                                       example_inputs=(x,))}


@pytest.fixture(scope="module")
def lowered_lenet300(masked_lenet300):
    """masked_lenet300 lowered with every kernel timed (0.7 s of CPU a lowering): built once for the module;
    a test that changes it deep-copies it first."""
    x, masked = masked_lenet300
    return fxcompress.compile(masked, [LowerToSparse(min_sparsity=0.0, **FAST)], example_inputs=(x,))


def _sparse_layers(gm):
    return {path: m for path, m in gm.named_modules() if isinstance(m, SparseLayer)}


@pytest.mark.parametrize("batch", [1, 8])
def test_lenet300_lowers_every_pruned_layer_and_computes_what_the_masked_model_does(batch):
    x = torch.randn(batch, 1, 28, 28)
    masked = _masked(LeNet300100(), x)
    lowered = fxcompress.compile(masked, [LowerToSparse(min_sparsity=0.0, **FAST)], example_inputs=(x,))
    for inputs in (x, torch.randn(3, 1, 28, 28)):  # any batch size runs, whatever the timing batch was
        torch.testing.assert_close(lowered(inputs), masked(inputs), rtol=1e-5, atol=1e-5)
    layers = _sparse_layers(lowered)
    assert set(layers) == {"fc1", "fc2", "fc3"}  # in the float layers' places
    stats = fxcompress.history(lowered)[-1].stats["layers"]
    for name, entry in stats.items():
        module = layers[entry["module"]]
        assert entry["kernel"] == module.kernel == module.kernel_choice.kernel
        assert set(entry["times_ms"]) == {"dense", "torch_csr", "scipy_csr", "scipy_csc", *C_KERNELS}  # no BSR
        assert entry["speedup"] == pytest.approx(entry["times_ms"]["dense"] / entry["times_ms"][entry["kernel"]],
                                                 rel=1e-3)
        assert entry["input_shape"] == [batch, module.in_features] and entry["held_bytes"] == module.held_bytes()
    assert sum(fxcompress.history(lowered)[-1].stats["kernels"].values()) == 3


def test_the_float_weights_masks_and_chains_are_gone(lowered_lenet300):
    lowered = lowered_lenet300
    names = set(lowered.state_dict())
    sparse = tuple(f"{path}." for path in _sparse_layers(lowered))
    assert not any(n.endswith(("weight_mask", ".weight", ".bias")) and not n.startswith(sparse) for n in names), names
    assert not list(lowered.parameters())
    for layer in _sparse_layers(lowered).values():  # held bytes: the chosen form only
        dense = layer.kernel == "dense"
        assert ("weight" in dict(layer.named_buffers())) == dense and ("values" in dict(layer.named_buffers())) != dense
    print(lowered)  # the emptied layer modules still print (a weightless nn.Linear would not)


def test_lenet5_convolutions_and_layers_below_min_sparsity():
    x = torch.randn(2, 1, 28, 28)
    masked = _masked(LeNet5(), x)
    sparsity = fxcompress.history(masked)[-1].stats["layers"]
    lowered = fxcompress.compile(masked, [LowerToSparse(min_sparsity=0.5, **FAST)], example_inputs=(x,))
    torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
    record = fxcompress.history(lowered)[-1].stats
    timed = {name for name, s in sparsity.items() if s >= 0.5}
    assert "conv2" in timed and timed != set(sparsity) and set(record["layers"]) == set(sparsity)
    for name, entry in record["layers"].items():  # below min_sparsity: folded to dense, its mask gone, not timed
        assert bool(entry["times_ms"]) == (name in timed) and (entry["kernel"] == "dense" or name in timed)
    assert set(record["skipped"]) == set(sparsity) - timed
    assert all("below min_sparsity 0.5" in reason for reason in record["skipped"].values())
    assert not any(name.endswith("weight_mask") for name in lowered.state_dict())


def test_encoded_layers_are_decoded_once_into_the_chosen_form(masked_lenet300):
    x, masked = masked_lenet300
    encoded = fxcompress.compile(masked, [InsertFakeQuant(bits=5, method="kmeans"), LowerToEncoded(bias="float16")],
                                 example_inputs=(x,))
    lowered = fxcompress.compile(encoded, [LowerToSparse(min_sparsity=0.0, **FAST)], example_inputs=(x,))
    torch.testing.assert_close(lowered(x), encoded(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, EncodedWeight) for m in lowered.modules())
    for layer in _sparse_layers(lowered).values():  # float32 values, or a 5-bit codebook in c_relative's codes
        held = dict(layer.named_buffers())
        assert held.get("values", held.get("codebook", held.get("weight"))).dtype == torch.float32
        assert layer.kernel != "c_relative" or (layer.shared and layer.codebook.numel() <= 2 ** 5 + 1)
    rows = {row["layer"]: row for row in fxcompress.summary(lowered, (x,)).rows}
    for path, layer in _sparse_layers(lowered).items():  # the bits a kept weight is stored in: uint8 codes or fp32
        assert rows[path.removesuffix(".sparse")]["bits"] == (8 if layer.shared else 32), path


def test_a_model_without_masks_is_unchanged_with_the_reasons():
    x = torch.randn(2, 1, 28, 28)
    gm = fxcompress.compile(LeNet300100().eval(), [LowerToSparse(**FAST)], example_inputs=(x,))
    record = fxcompress.history(gm)[-1]
    assert not record.changed and not _sparse_layers(gm)
    assert set(record.stats["skipped"]) == {"fc1", "fc2", "fc3"}
    assert all("no mask" in reason for reason in record.stats["skipped"].values())


@pytest.mark.parametrize("field, value", [("kernels", ("coo",)), ("kernels", ()), ("margin", 0.9), ("clock", "gpu"),
                                          ("repeats", 0), ("min_sparsity", 1.0), ("select", "fc(")])
def test_bad_configuration_is_refused_by_field(field, value):
    with pytest.raises(ConfigError, match=rf"LowerToSparse\.{field}"):
        LowerToSparse(**{field: value})


def test_save_load_keeps_the_choice_and_remeasure_rechooses(tmp_path):
    x = torch.randn(1, 1, 28, 28)
    masked = _masked(LeNet5(), x)
    lowered = fxcompress.compile(masked, [LowerToSparse(**FAST)], example_inputs=(x,))
    fxcompress.save(lowered, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    torch.testing.assert_close(loaded(x), masked(x), rtol=1e-5, atol=1e-5)
    before, after = _sparse_layers(lowered), _sparse_layers(loaded)
    assert {p: (m.kernel, m.kernel_choice) for p, m in after.items()} == \
        {p: (m.kernel, m.kernel_choice) for p, m in before.items()}
    rows = {row["layer"]: row for row in fxcompress.summary(loaded).rows}
    for path, layer in after.items():
        row = rows[path]
        assert row["kernel"] == layer.kernel
        assert row["latency_ms"] == (None if layer.kernel_choice is None else layer.kernel_choice.ms)
        assert row["compressed_bytes"] == layer.held_bytes() and row["nonzeros"] == layer.nonzeros()
    batch = torch.randn(16, 1, 28, 28)
    stats = remeasure(loaded, (batch,), repeats=2)
    assert set(stats) == set(after)
    assert all(after[p].kernel_choice.as_stats() == s for p, s in stats.items())
    torch.testing.assert_close(loaded(batch), masked(batch), rtol=1e-5, atol=1e-5)


def test_torch_export_and_compile_run_the_lowered_model(masked_lenet300, lowered_lenet300):
    x, masked = masked_lenet300
    lowered = copy.deepcopy(lowered_lenet300)  # its layers change form below
    for layer, kernel in zip(_sparse_layers(lowered).values(), (*C_KERNELS, "torch_csr", "scipy_csr", "scipy_csc")):
        layer.adopt(SparseLayer.from_dense(layer.kind, layer.dense_weight(), layer.bias, kernel))  # each form once
    exported = torch.export.export(lowered, (x,))
    assert any("fxcompress.sparse_linear" in str(n.target) for n in exported.graph.nodes)
    assert bool(C_KERNELS) == any("fxcompress.relative_linear" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), masked(x), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lowered, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not C_KERNELS, reason="no C compiler: the c_relative kernel cannot be built")
@pytest.mark.parametrize("shared", [False, True], ids=["float", "codebook"])
@pytest.mark.parametrize("kernel", C_KERNELS)
def test_c_relative_layers_save_load_and_remeasure(tmp_path, masked_lenet300_one_row, shared, kernel):
    """The file holds the relative indices and codes (checked on load); the kernel is bound again there."""
    x, models = masked_lenet300_one_row
    masked = models[shared]
    lowered = fxcompress.compile(masked, [LowerToSparse(min_sparsity=0.0, kernels=(kernel,), margin=1.0,
                                                        **FAST)], example_inputs=(x,))
    layers = _sparse_layers(lowered)
    for layer in layers.values():  # the form under test on every layer, whichever won the timing
        layer.adopt(SparseLayer.from_dense(layer.kind, layer.dense_weight(), layer.bias, kernel))
        assert layer.shared == shared
    fxcompress.save(lowered, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    assert all(m.kernel == kernel and m.shared == shared for m in _sparse_layers(loaded).values())
    batch = torch.randn(8, 1, 28, 28)
    for inputs in (x, batch):
        torch.testing.assert_close(loaded(inputs), masked(inputs), rtol=1e-5, atol=1e-5)
    stats = remeasure(loaded, (batch,), repeats=2)
    assert all(kernel in s["times_ms"] for s in stats.values())
    torch.testing.assert_close(loaded(batch), masked(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["torch_csr", "scipy_csr", "scipy_csc", *C_KERNELS])
def test_an_unbatched_image_runs_every_sparse_form(kernel):
    """F.conv2d takes an unbatched (C, H, W) image, so the masked model did; the sparse forms' im2col read its
    channels as the batch and raised a ValueError from Python's unpacking."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    masked = _masked(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=(1, 2))).eval(), x, sparsity=0.8)
    lowered = fxcompress.compile(masked, [LowerToSparse(min_sparsity=0.0, kernels=(kernel,), margin=1.0, **FAST)],
                                 example_inputs=(x,))
    (layer,) = _sparse_layers(lowered).values()
    layer.adopt(SparseLayer.from_dense("conv2d", layer.dense_weight().clone(), layer.bias, kernel,
                                       {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}))
    image = torch.randn(3, 10, 10)
    with torch.no_grad():
        got, expected = lowered(image), masked(image)
    assert layer.kernel == kernel and got.shape == expected.shape == (8, 5, 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_model_converted_after_lowering_refuses_by_name_then_remeasures_for_its_dtype(masked_lenet300,
                                                                                      lowered_lenet300, dtype):
    """After `.double()` a c_relative layer handed float64 memory to a kernel reading float32 (outputs of 1e20,
    silently), and the CSR / scipy forms raised torch's or scipy's own errors on other dtypes."""
    x, masked = masked_lenet300
    lowered = copy.deepcopy(lowered_lenet300)  # its layers change form below
    kernels = (*C_KERNELS, "torch_csr", "scipy_csr")
    for layer, kernel in zip(_sparse_layers(lowered).values(), kernels):
        layer.adopt(SparseLayer.from_dense(layer.kind, layer.dense_weight(), layer.bias, kernel))
    lowered.to(dtype)
    first = kernels[0]
    with pytest.raises(fxcompress.errors.PreconditionError, match=f"SparseLayer fc1: kernel '{first}' holds float32 "
                                                                  f"weights .* got a {str(dtype)[6:]} input"):
        lowered(x.to(dtype))
    remeasure(lowered, (x.to(dtype),), repeats=1)  # each layer chooses among the forms that multiply the dtype
    assert all(layer.dtype == str(dtype)[6:] for layer in _sparse_layers(lowered).values())
    expected = copy.deepcopy(masked).to(dtype)(x.to(dtype))
    tolerance = 1e-5 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(lowered(x.to(dtype)), expected, rtol=tolerance, atol=tolerance)
