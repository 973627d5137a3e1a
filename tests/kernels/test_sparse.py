import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.kernels import KernelChoice, SparseLayer, choose_kernel, remeasure
from fxcompress.kernels import sparse
from fxcompress.kernels.sparse import (BSR_MIN_FILL, SPARSE_KERNELS, bsr_blocksize, candidate_kernels, choose_form,
                                       relative_available, relative_form, remeasure_layer)

needs_c = pytest.mark.skipif(not relative_available(), reason="no C compiler: the c_relative kernel cannot be built")

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


C_KERNELS = [pytest.param("c_relative", marks=needs_c), pytest.param("c_relative_csc", marks=needs_c)]


@pytest.mark.parametrize("kernel", ["dense", "torch_csr", "scipy_csr", "scipy_csc", *C_KERNELS])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 3, 96)], ids=["batch1", "batch7", "3d"])
def test_linear_forms_compute_the_layer(kernel, shape):
    weight, bias, x = _pruned(40, 96), torch.randn(40), torch.randn(*shape)
    layer = SparseLayer.from_dense("linear", weight, bias, kernel)
    out = layer(x)
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "torch_csr", "scipy_csr", "scipy_csc", *C_KERNELS])
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
    c_kernel = ["c_relative", "c_relative_csc"] if relative_available() else []
    assert candidate_kernels(scattered, SPARSE_KERNELS) == ["dense", "torch_csr", "scipy_csr", "scipy_csc", *c_kernel]
    assert candidate_kernels(weight, SPARSE_KERNELS) == ["dense", "torch_csr", "scipy_csr", "scipy_csc", "torch_bsr",
                                                         *c_kernel]
    with pytest.raises(PreconditionError, match="no block size"):
        SparseLayer.from_dense("linear", scattered, bias, "torch_bsr")


@pytest.mark.parametrize("kernel", [k for k in SPARSE_KERNELS if k != "c_relative"] + C_KERNELS)
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

    # sleeping takes time but no CPU; 15 times the busy loop's CPU time, so that on a loaded machine
    # (where the busy loop's 2 ms of CPU take longer to get) wall-clock still ranks it first
    candidates = {"dense": lambda: time.sleep(0.03), "busy": busy}
    assert choose_kernel(candidates, (), baseline="dense", repeats=3, clock="wall").kernel == "busy"
    by_cpu = choose_kernel(candidates, (), baseline="dense", repeats=3, clock="thread")
    assert by_cpu.kernel == "dense" and by_cpu.times_ms["dense"] < 1.0 <= by_cpu.times_ms["busy"]
    with pytest.raises(ConfigError, match="clock must be one of"):
        choose_kernel(candidates, (), baseline="dense", clock="gpu")


# --- c_relative: Deep Compression's storage (relative indices, codebook codes) run by our C kernel ---

def _within_summation_error(out, x, weight, bias):
    """`out` equals x @ weight.T + bias up to float32 summation-order error: against the float64 product,
    at most (terms + 1) float32 roundings of the sum of absolute products (the recursive-sum bound)."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ weight.double().abs().T + (0 if bias is None else bias.double().abs())
    terms = int((weight != 0).sum(1).max()) + 2
    assert out.dtype == torch.float32 and out.shape == exact.shape
    slack = (out.double() - exact).abs() - terms * 2.0 ** -24 * scale
    assert float(slack.max()) <= 1e-30, f"off by more than summation order: {float(slack.max())}"


def _weight(rows, cols, sparsity, shared=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * (torch.rand(rows, cols, generator=generator) >= sparsity)
    return torch.round(weight * 8) / 8 if shared else weight  # at most 256 distinct values: a codebook


RELATIVE = ["c_relative", "c_relative_csc"]


@needs_c
@pytest.mark.parametrize("rows, cols, sparsity", [(1, 1, 0.0), (5, 3, 0.0), (40, 96, 0.5), (64, 300, 0.9),
                                                  (33, 1000, 0.99), (9, 5000, 0.999), (17, 8, 1.0)])
@pytest.mark.parametrize("shared", [False, True], ids=["float", "codebook"])
@pytest.mark.parametrize("batch", [1, 8, 13])
@pytest.mark.parametrize("kernel", RELATIVE)
def test_c_relative_equals_the_dense_product(rows, cols, sparsity, shared, batch, kernel):
    weight, bias = _weight(rows, cols, sparsity, shared), torch.randn(rows)
    weight[rows // 2] = 0  # an empty row
    weight[:, cols // 2] = 0  # an empty column
    layer = SparseLayer.from_dense("linear", weight, bias, kernel)
    assert layer.shared == ("codes" in layer._buffers) and (layer.shared or not shared or weight.any())
    x = torch.randn(batch, cols)
    x[:, cols // 3] = 0  # a zero input (as after a ReLU: c_relative_csc skips its column)
    x[batch // 2, :cols // 2] = 0
    _within_summation_error(layer(x), x, weight, bias)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=0)
    assert layer.nonzeros() == int(torch.count_nonzero(weight))


@needs_c
@pytest.mark.parametrize("shared", [False, True], ids=["float", "codebook"])
@pytest.mark.parametrize("kernel", RELATIVE)
def test_c_relative_bridges_long_gaps_with_filler_zeros(shared, kernel):
    weight = torch.zeros(3, 2000)
    columns = [*range(100), 355, 612, 1999]           # gaps 0 (x 100), 255, 256, 1386
    weight[0, columns] = torch.arange(1.0, 104.0) / 8
    weight[1, :300] = torch.randn(300) + 10            # 300 more values: no codebook unless shared
    weight[2, 300] = -5.0                              # a row starting past 255
    if shared:
        weight = torch.round(weight * 8) / 8
    form = relative_form(weight)
    assert form["gaps"].dtype == torch.uint8 and form["crow_indices"].tolist() == [0, 109, 409, 411]
    # 255 zeros fit one gap; 256 need a filler zero at column 611; 1386 need five fillers and 106
    assert form["gaps"][100:109].tolist() == [255, 255, 0, 255, 255, 255, 255, 255, 106]
    assert form["gaps"][109:409].tolist() == [0] * 300 and form["gaps"][409:].tolist() == [255, 44]
    assert ("codes" in form) == shared
    layer = SparseLayer.from_dense("linear", weight if kernel == "c_relative" else weight.t(), None, kernel)
    assert layer.gaps.tolist() == form["gaps"].tolist()  # the csc form of the transpose is the same storage
    weight = layer.dense_weight()
    for batch in (1, 8):
        x = torch.randn(batch, weight.shape[1])
        _within_summation_error(layer(x), x, weight, None)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=0)
    assert layer.nonzeros() == 404


@needs_c
@pytest.mark.parametrize("kernel", RELATIVE)
def test_c_relative_picks_16_bit_indices_where_fillers_would_cost_more(kernel):
    weight = torch.zeros(4, 200000)
    weight[:3, ::9000] = torch.randn(3, 23)                   # gaps of 8999: 35 fillers each in 8 bits
    weight[1, 199999] = 1.5
    weight[3, [0, 150000]] = torch.tensor([2.0, -3.0])        # a gap of 149999: two fillers in 16 bits
    weight = weight if kernel == "c_relative" else weight.t().contiguous()
    layer = SparseLayer.from_dense("linear", weight, torch.randn(weight.shape[0]), kernel)
    assert layer.gap_dtype == "uint16" and layer.gaps.dtype == torch.int16 and layer.gaps.numel() == 3 * 23 + 1 + 4
    assert (layer.gaps[-3:].to(torch.int64) & 0xFFFF).tolist() == [65535, 65535, 149999 - 2 * 65536]
    for batch in (1, 8):
        x = torch.randn(batch, weight.shape[1])
        _within_summation_error(layer(x), x, weight, layer.bias)
    torch.testing.assert_close(layer.dense_weight(), weight, rtol=0, atol=0)


@needs_c
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 700), sparsity=st.sampled_from([0.0, 0.3, 0.9, 0.99, 0.999]),
       shared=st.booleans(), batch=st.integers(1, 17), seed=st.integers(0, 2 ** 16), kernel=st.sampled_from(RELATIVE))
def test_c_relative_property(rows, cols, sparsity, shared, batch, seed, kernel):
    weight = _weight(rows, cols, sparsity, shared, seed)
    layer = SparseLayer.from_dense("linear", weight, torch.randn(rows), kernel)
    x = torch.relu(torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed)))
    _within_summation_error(layer(x), x, weight, layer.bias)


@needs_c
def test_c_relative_holds_a_byte_per_index_and_per_code():
    weight, bias = _weight(300, 784, 0.9, shared=True), torch.randn(300)
    layer = SparseLayer.from_dense("linear", weight, bias, "c_relative")
    entries = layer.gaps.numel()
    assert layer.shared and layer.gaps.dtype == layer.codes.dtype == torch.uint8
    assert set(dict(layer.named_buffers())) == {"crow_indices", "gaps", "codes", "codebook", "bias"}
    assert layer.held_bytes() == 2 * entries + 4 * layer.codebook.numel() + 4 * 301 + 4 * 300
    csr = SparseLayer.from_dense("linear", weight, bias, "scipy_csr")
    assert layer.held_bytes() < 0.3 * csr.held_bytes()
    unshared = SparseLayer.from_dense("linear", _weight(300, 784, 0.9), bias, "c_relative")
    assert not unshared.shared and unshared.values.dtype == torch.float32


def _relative_loaded(shared=True):
    layer = SparseLayer.from_dense("linear", _weight(8, 600, 0.9, shared), torch.randn(8), "c_relative")
    layer.check_loaded("fc.sparse")
    return layer


@needs_c
@pytest.mark.parametrize("tamper, match", [
    (lambda m: m.gaps.__setitem__(-1, 255), "'gaps' runs a row past its 600 columns"),
    (lambda m: m.codes.__setitem__(0, 255), "'codes' indexes outside its codebook"),
    (lambda m: setattr(m, "codebook", torch.zeros(300)), "'codes' indexes outside its codebook of 300"),
    (lambda m: m.crow_indices.__setitem__(2, -1), "'crow_indices' is not a row-pointer array"),
    (lambda m: setattr(m, "gaps", m.gaps.to(torch.int16)), "'gaps' is torch.int16"),
    (lambda m: setattr(m, "codes", m.codes[:-1]), "'codes' is torch.uint8"),
])
def test_c_relative_tensors_from_a_file_are_checked(tamper, match):
    layer = _relative_loaded()
    tamper(layer)
    with pytest.raises(FormatError, match=rf"SparseLayer fc\.sparse: tensor {match}"):
        layer.check_loaded("fc.sparse")


def test_c_relative_configuration_is_checked():
    with pytest.raises(ConfigError, match="gap_dtype None"):
        SparseLayer("linear", [4, 4], "c_relative")
    with pytest.raises(ConfigError, match="other kernels take neither"):
        SparseLayer("linear", [4, 4], "scipy_csr", gap_dtype="uint8")
    with pytest.raises(ConfigError, match="dtype 'float64'"):
        SparseLayer("linear", [4, 4], "c_relative", gap_dtype="uint8", dtype="float64")
    with pytest.raises(PreconditionError, match="float32 weights"):
        SparseLayer.from_dense("linear", _pruned(4, 8, dtype=torch.float64), None, "c_relative")


@needs_c
def test_without_a_compiler_c_relative_is_no_candidate_and_a_loaded_one_runs_on_scipy(monkeypatch):
    layer = _relative_loaded(shared=False)
    weight, x = layer.dense_weight().clone(), torch.randn(2, 600)
    monkeypatch.setattr(sparse, "_relative_functions", lambda: None)
    assert "c_relative" not in candidate_kernels(weight, SPARSE_KERNELS)
    with pytest.raises(PreconditionError, match="no C compiler here"):
        layer(x)
    with pytest.warns(UserWarning, match="running scipy_csr instead"):
        layer.check_loaded("fc.sparse")
    assert layer.kernel == "scipy_csr" and layer.gap_dtype is None and "gaps" not in layer._buffers
    torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_c
def test_c_relative_refuses_inputs_it_cannot_multiply_by_name():
    layer = SparseLayer.from_dense("linear", _pruned(8, 16), None, "c_relative")
    with pytest.raises(PreconditionError, match="'c_relative' holds float32 weights and takes float32 inputs only, "
                                                "got a float64 input"):
        layer(torch.randn(2, 16, dtype=torch.float64))


@needs_c
def test_c_relative_csc_refuses_weights_it_would_not_multiply_exactly():
    weight = _pruned(8, 16)
    weight[0, 0] = float("inf")
    with pytest.raises(PreconditionError, match="'c_relative_csc' skips zero inputs.*inf or nan"):
        SparseLayer.from_dense("linear", weight, None, "c_relative_csc")
    layer = SparseLayer.from_dense("linear", _pruned(40, 96, sparsity=0.5), None, "c_relative_csc")
    layer.check_loaded("fc.sparse")
    assert not layer.shared
    layer.values[0] = float("nan")
    with pytest.raises(FormatError, match="tensor 'values' holds inf or nan"):
        layer.check_loaded("fc.sparse")


@needs_c
def test_c_relative_keeps_nan_and_inf_weights_as_values():
    weight = torch.zeros(2, 300)
    weight[0, [3, 100]] = torch.tensor([float("nan"), 1.0])
    weight[1, 299] = float("inf")
    layer = SparseLayer.from_dense("linear", weight, None, "c_relative")
    assert not layer.shared  # a codebook would sort nan away from its code
    out = layer(torch.ones(1, 300))
    assert out[0, 0].isnan() and out[0, 1] == float("inf")


@pytest.mark.parametrize("kernel", ["dense", "torch_csr", "scipy_csr", "scipy_csc", *C_KERNELS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_input_of_another_dtype_is_refused_by_name_whatever_the_kernel(kernel, dtype):
    """The kernel is chosen by timing, so what an input of another dtype does must not depend on it: each
    raised torch's or scipy's own error, or (scipy, float64) silently returned float64."""
    layer = SparseLayer.from_dense("linear", _pruned(8, 16), torch.randn(8), kernel)
    layer._where = "SparseLayer fc1"
    with pytest.raises(PreconditionError, match=f"SparseLayer fc1: kernel '{kernel}' holds float32 weights .* got a "
                                                f"{str(dtype).removeprefix('torch.')} input"):
        layer(torch.randn(2, 16).to(dtype))


@pytest.mark.parametrize("kernel", [*C_KERNELS])
def test_converting_a_c_relative_layer_leaves_the_float32_its_kernel_reads(kernel):
    """model.double() gave the C kernel float64 codebooks and biases to read as float32: outputs of 1e20."""
    weight, bias = _pruned(8, 16), torch.randn(8)
    for shared_weight in (weight, torch.round(weight * 2) / 2):  # values, and codes into a codebook
        layer = SparseLayer.from_dense("linear", shared_weight, bias, kernel).double()
        assert all(t.dtype != torch.float64 for t in layer.buffers()) and layer.dtype == "float32"
        x = torch.randn(3, 16)
        torch.testing.assert_close(layer(x), F.linear(x, shared_weight, bias), rtol=1e-5, atol=1e-5)
        with pytest.raises(PreconditionError, match="multiplies float32 only: to run in float64, remeasure"):
            layer(x.double())


def test_half_converts_the_dense_form_and_keeps_sparse_forms_torch_cannot_multiply_in_half():
    weight, bias = _pruned(8, 16), torch.randn(8)
    dense = SparseLayer.from_dense("linear", weight, bias, "dense").half()
    assert dense.dtype == "float16" and dense.weight.dtype == torch.float16
    x = torch.randn(3, 16)
    torch.testing.assert_close(dense(x.half()), F.linear(x.half(), weight.half(), bias.half()))
    csr = SparseLayer.from_dense("linear", weight, bias, "torch_csr").half()  # torch has no float16 CSR product
    assert csr.dtype == "float32" and csr.values.dtype == torch.float32 and csr.bias.dtype == torch.float32
    with pytest.raises(PreconditionError, match="torch_csr' holds float32 .* got a float16 input"):
        csr(x.half())
    remeasure_layer(csr, x.half(), repeats=1)  # chooses again among the forms that multiply float16
    assert csr.kernel == "dense" and csr.dtype == "float16"
    torch.testing.assert_close(csr(x.half()), F.linear(x.half(), weight.half(), bias.half()))
