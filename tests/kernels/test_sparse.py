import time

import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.kernels import KernelChoice, SparseLayer, choose_kernel, remeasure
from fxcompress.kernels.sparse import (BSR_MIN_FILL, SPARSE_KERNELS, bsr_blocksize, candidate_kernels, choose_form,
                                       remeasure_layer)

CONV = {"stride": [2, 1], "padding": [1, 2], "dilation": [1, 2]}


def _pruned(*shape, sparsity=0.9, dtype=torch.float32):
    weight = torch.randn(*shape, dtype=dtype)
    return weight * (torch.rand(shape) >= sparsity)


def _blocky(rows=64, cols=128, block=16):
    """A weight whose nonzeros fill whole 16 x 16 blocks (structured pruning)."""
    weight = torch.zeros(rows, cols)
    for r, c in ((0, 0), (1, 3), (2, 5), (3, 7)):
        weight[r * block:(r + 1) * block, c * block:(c + 1) * block] = torch.randn(block, block)
    return weight


def _reference(kind, x, weight, bias):
    return F.linear(x, weight, bias) if kind == "linear" else F.conv2d(x, weight, bias, **CONV)


@pytest.mark.parametrize("kernel", ["dense", "torch_csr", "scipy_csr", "scipy_csc"])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96)], ids=["batch1", "batch7", "3d"])
def test_linear_forms_compute_the_layer(kernel, shape):
    weight, bias, x = _pruned(40, 96), torch.randn(40), torch.randn(*shape)
    layer = SparseLayer.from_dense("linear", weight, bias, kernel)
    out = layer(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "torch_csr", "scipy_csr", "scipy_csc"])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv2d_forms_compute_the_layer_through_im2col(kernel, batch):
    weight, bias, x = _pruned(12, 5, 3, 3, sparsity=0.8), torch.randn(12), torch.randn(batch, 5, 9, 11)
    layer = SparseLayer.from_dense("conv2d", weight, bias, kernel, CONV)
    torch.testing.assert_close(layer(x), _reference("conv2d", x, weight, bias), rtol=1e-5, atol=1e-5)


def test_float64_and_no_bias():
    weight, x = _pruned(8, 16, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    for kernel in ("torch_csr", "scipy_csr", "scipy_csc"):
        layer = SparseLayer.from_dense("linear", weight, None, kernel)
        assert layer.bias is None and layer.values.dtype == torch.float64
        torch.testing.assert_close(layer(x), x @ weight.T)


def test_a_sparse_form_holds_only_its_csr_arrays():
    weight, bias = _pruned(300, 784), torch.randn(300)
    layer = SparseLayer.from_dense("linear", weight, bias, "scipy_csr")
    nonzeros = int(torch.count_nonzero(weight))
    assert set(dict(layer.named_buffers())) == {"crow_indices", "col_indices", "values", "bias"}
    assert layer.col_indices.dtype == torch.int32 and layer.values.shape == (nonzeros,)
    assert layer.held_bytes() == 8 * nonzeros + 4 * 301 + 4 * 300
    assert layer.held_bytes() < 0.25 * (weight.numel() + 300) * 4  # 90% sparse: under a quarter of dense
    assert layer.nonzeros() == nonzeros
    torch.testing.assert_close(layer.dense_weight(), weight)


def test_bsr_runs_block_structured_weights_and_is_no_candidate_for_scattered_ones():
    weight, bias, x = _blocky(), torch.randn(64), torch.randn(5, 128)
    assert bsr_blocksize(weight) == 16
    layer = SparseLayer.from_dense("linear", weight, bias, "torch_bsr")
    assert layer.values.shape == (4, 16, 16) and layer.blocksize == 16
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), weight)
    scattered = _pruned(64, 128)
    assert bsr_blocksize(scattered) is None and BSR_MIN_FILL > 0.1
    assert candidate_kernels(scattered, SPARSE_KERNELS) == ["dense", "torch_csr", "scipy_csr", "scipy_csc"]
    assert candidate_kernels(weight, SPARSE_KERNELS) == ["dense", *SPARSE_KERNELS]
    with pytest.raises(PreconditionError, match="no block size"):
        SparseLayer.from_dense("linear", scattered, bias, "torch_bsr")


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
def test_the_input_gets_the_dense_layers_gradient(kernel):
    weight, bias = (_blocky(), torch.randn(64)) if kernel == "torch_bsr" else (_pruned(64, 128), torch.randn(64))
    layer = SparseLayer.from_dense("linear", weight, bias, kernel)
    x = torch.randn(4, 128, requires_grad=True)
    (layer(x) * torch.arange(64.0)).sum().backward()
    expected = torch.arange(64.0).expand(4, 64) @ weight
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-4)


def test_choose_form_times_every_candidate_and_keeps_dense_unless_beaten_by_the_margin():
    weight, bias, x = _pruned(200, 400, sparsity=0.95), torch.randn(200), torch.randn(1, 400)
    chosen = choose_form("linear", weight, bias, x, ("torch_csr", "scipy_csr"), repeats=3, margin=1.2)
    choice = chosen.kernel_choice
    assert set(choice.times_ms) == {"dense", "torch_csr", "scipy_csr"} and chosen.kernel == choice.kernel
    if chosen.kernel != "dense":
        assert choice.times_ms[chosen.kernel] * 1.2 <= choice.times_ms["dense"]
    else:
        assert min(choice.times_ms.values()) * 1.2 > choice.times_ms["dense"]
    torch.testing.assert_close(chosen(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_remeasure_layer_switches_the_form_in_place_and_keeps_the_outputs():
    weight, bias, x = _pruned(32, 64), torch.randn(32), torch.randn(2, 64)
    layer = SparseLayer.from_dense("linear", weight, bias, "dense")
    choice = remeasure_layer(layer, x, ("scipy_csr",), repeats=2, margin=1.0)
    assert isinstance(choice, KernelChoice) and layer.kernel == choice.kernel == min(choice.times_ms,
                                                                                     key=choice.times_ms.get)
    expected = {"weight", "bias"} if layer.kernel == "dense" else {"crow_indices", "col_indices", "values", "bias"}
    assert set(dict(layer.named_buffers())) == expected
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_remeasure_refuses_a_model_without_sparse_layers():
    with pytest.raises(ConfigError, match="no SparseLayer"):
        remeasure(torch.nn.Linear(2, 2), (torch.randn(1, 2),))


def test_remeasure_rechooses_every_layer_of_a_model():
    model = torch.nn.Sequential(SparseLayer.from_dense("linear", _pruned(16, 8), None, "torch_csr"), torch.nn.ReLU(),
                                SparseLayer.from_dense("linear", _pruned(4, 16), torch.randn(4), "scipy_csr"))
    x = torch.randn(3, 8)
    before = model(x)
    stats = remeasure(model, (x,), repeats=2)
    assert set(stats) == {"0", "2"}
    for path, entry in stats.items():
        assert model.get_submodule(path).kernel == entry["kernel"] and "dense" in entry["times_ms"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_bad_configurations_are_refused_by_name():
    with pytest.raises(ConfigError, match="kind must be one of"):
        SparseLayer("lstm", [4, 4], "dense")
    with pytest.raises(ConfigError, match="kernel='coo'"):
        SparseLayer("linear", [4, 4], "coo")
    with pytest.raises(ConfigError, match="blocksize"):
        SparseLayer("linear", [4, 6], "torch_bsr", blocksize=4)
    with pytest.raises(ConfigError, match="not measured"):
        SparseLayer("linear", [4, 4], "scipy_csr", times_ms={"dense": 1.0})


def _loaded(kernel="scipy_csr"):
    layer = SparseLayer.from_dense("linear", _pruned(8, 16, sparsity=0.5), torch.randn(8), kernel)
    layer.check_loaded("fc.sparse")
    return layer


@pytest.mark.parametrize("tamper, match", [
    (lambda m: m.col_indices.__setitem__(0, 16), "'col_indices' holds a column outside"),
    (lambda m: m.col_indices.__setitem__(0, -1), "'col_indices' holds a column outside"),
    (lambda m: m.crow_indices.__setitem__(3, 1000), "'crow_indices' is not a row-pointer array"),
    (lambda m: setattr(m, "values", m.values.double()), "'values' is torch.float64"),
    (lambda m: setattr(m, "crow_indices", m.crow_indices.long()), "'crow_indices' is torch.int64"),
    (lambda m: setattr(m, "bias", m.bias[:3]), "'bias' is torch.float32 \\[3\\]"),
])
def test_tensors_from_a_file_are_checked_before_any_kernel_reads_them(tamper, match):
    layer = _loaded()
    tamper(layer)
    with pytest.raises(FormatError, match=rf"SparseLayer fc\.sparse: tensor {match}"):
        layer.check_loaded("fc.sparse")


def test_csc_indices_are_checked_against_the_output_size():
    layer = SparseLayer.from_dense("linear", _pruned(8, 16, sparsity=0.5), None, "scipy_csc")
    assert layer.crow_indices.shape == (17,)  # one pointer per input feature: CSR of the transposed weight
    layer.check_loaded("fc.sparse")
    layer.col_indices[0] = 8  # a column of the weight's shape, but no output of this layer
    with pytest.raises(FormatError, match="'col_indices' holds a column outside \\[0, 8\\)"):
        layer.check_loaded("fc.sparse")


def test_scipy_kernels_refuse_inputs_off_the_cpu_by_name():
    layer = SparseLayer.from_dense("linear", _pruned(8, 16), None, "scipy_csc")
    with pytest.raises(PreconditionError, match="kernel 'scipy_csc' runs on the CPU only, got an input on meta"):
        layer(torch.randn(2, 16, device="meta"))


def test_the_thread_clock_counts_work_not_waiting():
    def busy():
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    candidates = {"dense": lambda: time.sleep(0.006), "busy": busy}  # sleeping takes time but no CPU
    assert choose_kernel(candidates, (), baseline="dense", repeats=3, clock="wall").kernel == "busy"
    by_cpu = choose_kernel(candidates, (), baseline="dense", repeats=3, clock="thread")
    assert by_cpu.kernel == "dense" and by_cpu.times_ms["dense"] < 1.0 <= by_cpu.times_ms["busy"]
    with pytest.raises(ConfigError, match="clock must be one of"):
        choose_kernel(candidates, (), baseline="dense", clock="gpu")
