"""Sparse execution of pruned linear / conv2d layers, holding only the form the layer runs.

A `SparseLayer` computes one layer from one stored form of its weight, chosen by measurement:

- "dense": the float weight and `F.linear` / `F.conv2d` (kept where no sparse form is faster);
- "torch_csr": CSR buffers (int32 row pointers and column indices, float values) run by torch's sparse
  CSR matmul (MKL on x86), which wins at batch > 1 here;
- "scipy_csr": the same buffers run by scipy's CSR matrix-vector product, which wins at batch 1 (about
  2.5x over dense at 91% sparsity on AlexNet's 9216 -> 4096 here, where torch's CSR reached 2.2x);
- "scipy_csc": the buffers of the transposed weight (CSR of [in, out], that is CSC of the weight) run
  by scipy's CSC product, which scatters into the short output instead of gathering from a long input
  (VGG-16's 25088 -> 4096: the output fits in L1 where the input does not);
- "torch_bsr": block-sparse rows (dense b x b blocks) by torch's BSR matmul, a candidate only where
  the kept weights fill their blocks (structured pruning), as random sparsity leaves blocks nearly empty;
- "c_relative": Deep Compression's storage (per row, each nonzero as the count of zeros before it in
  a uint8 — uint16 where filler zeros would cost more — and its value as a uint8 code into a float32
  codebook where the layer has at most 256 distinct weights, float32 otherwise) run by our own
  single-threaded C kernel (csrc/sparse_relative.c): 2-3 bytes a weight instead of CSR's 8, and a
  product that beat torch's and scipy's CSR 1.5-2x at batch 1 here (benchmarks/deploy_sparse.py).
  A candidate only where the machine's C compiler built it; a file holding it loads elsewhere too
  (it then runs scipy's CSR, with a warning);
- "c_relative_csc": the same storage by columns (the weight's transpose), a product that reads the
  input once and scatters into the output, skipping every zero input (a ReLU's zeros cost nothing);
  it wins where the input is long (VGG-16's 25088) or half zeros. Finite weights only (0 * inf).

A conv2d layer runs as im2col (`F.unfold`) and one sparse matmul over every output position.

Both sparse matmuls are wrapped in one custom op (`torch.ops.fxcompress.sparse_linear`) over plain
tensors, so `torch.compile` and `torch.export` see an opaque call with a known output shape instead of
a scipy call or a sparse tensor they cannot trace. The CSR / BSR views (a torch sparse tensor, a scipy
matrix) share the buffers' memory: no second copy of the weight is made. Gradients flow to the input
(a lowered layer may sit behind layers that still train), never to the stored weight: train the masked
model, then lower it.

Indices from a file are untrusted and scipy does not check them: `check_loaded` validates every
row pointer and column index before any kernel reads them.
"""
from __future__ import annotations

import ctypes
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, FormatError, PreconditionError
from .compiled import library as c_library
from .timing import KernelChoice, choose_kernel, run_reaching

if TYPE_CHECKING:  # annotations only; scipy is imported where a scipy kernel builds its matrix
    import scipy.sparse

KERNELS = ("dense", "torch_csr", "scipy_csr", "scipy_csc", "torch_bsr", "c_relative", "c_relative_csc")
SPARSE_KERNELS = KERNELS[1:]
KINDS = ("linear", "conv2d")                 # layer kinds a SparseLayer computes
DTYPES = (torch.float32, torch.float64)      # value dtypes both sparse libraries multiply
INDEX_DTYPE = torch.int32                    # half the index bytes of torch's default int64
BSR_BLOCKS = (16, 8, 4)                      # block sizes tried, largest first
BSR_MIN_FILL = 0.5                           # a BSR candidate needs its blocks at least this full
# c_relative's relative indices; 16-bit ones are held as int16 bits (an integer type files know) and
# read unsigned by the kernel
GAP_DTYPES = {"uint8": torch.uint8, "uint16": torch.int16}
GAP_MAX = {"uint8": 255, "uint16": 65535}
CODEBOOK_MAX = 256                           # c_relative's codes are uint8
RELATIVE_BUFFERS = ("gaps", "codes", "codebook")  # c_relative's tensors besides crow_indices / values
RELATIVE = ("c_relative", "c_relative_csc")  # our C kernels: the weight's rows, or (csc) its columns
TRANSPOSED = ("scipy_csc", "c_relative_csc")  # kernels storing the transposed weight [in, out]
# the value dtypes each kernel multiplies: torch's dense ops take every float dtype, its sparse CSR / BSR
# products and scipy only DTYPES (no float16 product exists), our C kernels float32 alone (they read raw
# float32 memory). A conversion of the model (model.half()) leaves a layer's tensors in their dtype where
# its kernel cannot multiply the new one, and forward then refuses inputs of that dtype by name.
KERNEL_DTYPES = {"dense": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 **{kernel: DTYPES for kernel in ("torch_csr", "scipy_csr", "scipy_csc", "torch_bsr")},
                 **{kernel: (torch.float32,) for kernel in RELATIVE}}


def sparse_linear_eager(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                        bias: torch.Tensor | None, in_features: int, out_features: int, kernel: str) -> torch.Tensor:
    """x [M, in] times the transposed sparse weight [out, in] (CSR, or BSR when `values` is 3-D), plus bias."""
    if kernel.startswith("scipy"):
        if x.device.type != "cpu":
            raise PreconditionError(f"SparseLayer kernel {kernel!r} runs on the CPU only, got an input on "
                                    f"{x.device}; remeasure the model on that device (torch_csr runs there)")
        matrix = _scipy_weight(crow, col, values, in_features, out_features, kernel)
        if x.shape[0] == 1:  # one row: scipy's matrix-vector product, its fastest path
            out = torch.from_numpy(matrix @ x[0].detach().numpy()).unsqueeze(0)
        else:
            out = torch.from_numpy(np.ascontiguousarray((matrix @ x.detach().numpy().T).T))
    else:
        make = torch.sparse_bsr_tensor if values.dim() == 3 else torch.sparse_csr_tensor
        weight = make(crow, col, values, (out_features, in_features), check_invariants=False)
        out = torch.mm(weight, x.t()).t().contiguous()
    return out.add_(bias) if bias is not None else out


# The same product as an opaque custom op, for graphs that torch.compile / torch.export trace and for
# autograd; eager inference calls the function itself (the op's wrapper imports torch._dynamo on first
# use, seconds, and costs microseconds per call on layers that take microseconds).
sparse_linear = torch.library.custom_op("fxcompress::sparse_linear", sparse_linear_eager, mutates_args=())


@sparse_linear.register_fake
def _(x, crow, col, values, bias, in_features, out_features, kernel):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("fxcompress::sparse_linear_input_grad", mutates_args=())
def sparse_linear_input_grad(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                             in_features: int, out_features: int, kernel: str) -> torch.Tensor:
    """grad [M, out] times the sparse weight [out, in]: the gradient of sparse_linear's input, so a
    lowered layer can sit behind layers that still train (its own weight receives none)."""
    if kernel.startswith("scipy"):
        matrix = _scipy_weight(crow, col, values, in_features, out_features, kernel)
        return torch.from_numpy(np.ascontiguousarray((matrix.T @ grad.numpy().T).T))
    if values.dim() == 3:  # torch has no CPU product with a transposed BSR matrix: a temporary dense one
        weight = torch.sparse_bsr_tensor(crow, col, values, (out_features, in_features), check_invariants=False)
        return grad @ weight.to_dense()
    weight = torch.sparse_csr_tensor(crow, col, values, (out_features, in_features), check_invariants=False)
    return torch.mm(weight.t(), grad.t()).t().contiguous()


@sparse_linear_input_grad.register_fake
def _(grad, crow, col, values, in_features, out_features, kernel):
    return grad.new_empty((grad.shape[0], in_features))


def _backward(ctx, grad):
    crow, col, values = ctx.saved_tensors
    dx = torch.ops.fxcompress.sparse_linear_input_grad(grad.contiguous(), crow, col, values, *ctx.sizes)
    return dx, None, None, None, None, None, None, None


def _save_for_backward(ctx, inputs, output):
    _, crow, col, values, _, in_features, out_features, kernel = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.sizes = (in_features, out_features, kernel)


sparse_linear.register_autograd(_backward, setup_context=_save_for_backward)


def relative_form(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Deep Compression's storage of a float32 weight matrix [out, in] for the c_relative kernel:
    per row, each nonzero as the count of zeros before it (`gaps`, uint8, or uint16 where that is
    smaller) with filler zeros bridging longer runs, and its value: a uint8 `codes` index into a
    float32 `codebook` where the layer has at most 256 distinct weights (fillers included), `values`
    otherwise. `crow_indices` (int32) delimits each row's entries."""
    rows, cols = matrix.shape
    where = matrix.nonzero()
    row, col = where[:, 0], where[:, 1]
    kept = matrix[row, col]
    previous = torch.full_like(col, -1)
    previous[1:] = torch.where(row[1:] == row[:-1], col[:-1], -1)
    gap = col - previous - 1
    gap_dtype = min(GAP_MAX, key=lambda name: _relative_bytes(gap, name))
    fillers = gap // (GAP_MAX[gap_dtype] + 1)
    per_entry = fillers + 1
    entries = int(per_entry.sum())
    if entries >= 2 ** 31:
        raise PreconditionError(f"c_relative: {entries} entries overflow its int32 row pointers")
    slot = per_entry.cumsum(0) - 1                         # each nonzero after its fillers
    gaps = torch.full((entries,), GAP_MAX[gap_dtype], dtype=torch.int64)
    gaps[slot] = gap - fillers * (GAP_MAX[gap_dtype] + 1)
    values = matrix.new_zeros(entries)
    values[slot] = kept
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.zeros(rows, dtype=torch.int64).index_add_(0, row, per_entry).cumsum(0)
    form = {"crow_indices": crow.to(INDEX_DTYPE), "gaps": _to_gap_dtype(gaps, gap_dtype)}
    codebook = torch.unique(values)                         # sorted; holds 0.0 where fillers exist
    if codebook.numel() <= CODEBOOK_MAX and bool(torch.isfinite(codebook).all()):  # nan has no place in a sort
        form.update(codes=torch.searchsorted(codebook, values).to(torch.uint8), codebook=codebook.contiguous())
    else:
        form["values"] = values.contiguous()
    return form


def _relative_bytes(gap: torch.Tensor, gap_dtype: str) -> int:
    """Bytes of the entries with `gap_dtype` indices (values counted at 4 bytes: codes only shrink both)."""
    entries = int((gap // (GAP_MAX[gap_dtype] + 1)).sum()) + gap.numel()
    return entries * (GAP_DTYPES[gap_dtype].itemsize + 4)


def _to_gap_dtype(gaps: torch.Tensor, gap_dtype: str) -> torch.Tensor:
    if gap_dtype == "uint8":
        return gaps.to(torch.uint8)
    return torch.where(gaps > 32767, gaps - 65536, gaps).to(torch.int16)  # the same 16 bits


def relative_columns(crow: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """Each entry's column (int64): one past the previous entry of its row, plus its gap."""
    steps = (gaps.to(torch.int64) & 0xFFFF) + 1
    total = steps.cumsum(0)
    starts = crow.to(torch.int64)
    before = torch.cat([total.new_zeros(1), total])[starts[:-1]]  # the running sum where each row starts
    counts = starts[1:] - starts[:-1]
    return total - before.repeat_interleave(counts, output_size=steps.numel()) - 1


def relative_values(values: torch.Tensor | None, codes: torch.Tensor | None,
                    codebook: torch.Tensor | None) -> torch.Tensor:
    """Each entry's float value (fillers are zeros)."""
    return values if values is not None else codebook[codes.to(torch.int64)]


def relative_csr(crow: torch.Tensor, gaps: torch.Tensor, values: torch.Tensor | None, codes: torch.Tensor | None,
                 codebook: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """The c_relative form as a torch CSR tensor [out, in] (a temporary; fillers kept as zeros)."""
    columns = relative_columns(crow, gaps).to(INDEX_DTYPE)
    with warnings.catch_warnings():  # torch calls its sparse CSR support beta: we check the results
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, relative_values(values, codes, codebook), shape,
                                       check_invariants=False)


@functools.cache
def _relative_functions() -> dict[tuple[str, str, str], Any] | None:
    """The C kernels by (matvec / matmul, 8-bit gaps, float32 values), argtypes set once (ctypes then
    converts plain ints without looking anything up); None where the library cannot be built here."""
    library = c_library("sparse_relative")
    if library is None:
        return None
    pointers, functions = [ctypes.c_void_p] * 8, {}
    for op, extra in (("matvec", [ctypes.c_int64]), ("matmul", [ctypes.c_int64] * 3),
                      ("scatter", [ctypes.c_int64] * 2), ("scatterb", [ctypes.c_int64] * 3)):
        for short, c_gap in ((True, "u8"), (False, "u16")):
            for floats, c_value in ((True, "f32"), (False, "code")):
                function = getattr(library, f"{op}_{c_gap}_{c_value}")
                function.argtypes, function.restype = pointers + extra, None
                functions[op, short, floats] = function
    return functions


def relative_available() -> bool:
    """Whether the c_relative kernel runs here (a C compiler built it)."""
    return _relative_functions() is not None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def relative_linear_eager(x: torch.Tensor, crow: torch.Tensor, gaps: torch.Tensor, values: torch.Tensor | None,
                          codes: torch.Tensor | None, codebook: torch.Tensor | None, bias: torch.Tensor | None,
                          in_features: int, out_features: int, transposed: bool) -> torch.Tensor:
    """x [M, in] times the transposed weight, plus bias, by the C kernel (one thread): the weight's rows
    in c_relative's storage, or with `transposed` its columns (c_relative_csc)."""
    # every step here costs microseconds on a layer that takes tens: cheap tests first, no copies of x
    functions = _relative_functions()
    if functions is None or not x.is_cpu or x.dtype is not torch.float32:
        raise PreconditionError(f"SparseLayer kernel 'c_relative' needs its C library and float32 CPU inputs, got "
                                f"{x.dtype} on {x.device}" + ("" if functions else " and no C compiler here")
                                + "; remeasure the model here to pick another kernel")
    if not x.is_contiguous():
        x = x.contiguous()
    batch = x.shape[0]
    out = torch.empty((batch, out_features))
    if batch == 0:
        return out
    key = (gaps.dtype is torch.uint8, codes is None)
    weight = (crow.data_ptr(), gaps.data_ptr(), _pointer(values), _pointer(codes), _pointer(codebook), _pointer(bias))
    if batch == 1:
        if transposed:
            functions["scatter", *key](*weight, x.data_ptr(), out.data_ptr(), in_features, out_features)
        else:
            functions["matvec", *key](*weight, x.data_ptr(), out.data_ptr(), out_features)
        return out
    stride = -(-batch // 8) * 8  # the kernel's tiles of 8 inputs, zero-padded
    xt = x.new_zeros((in_features, stride))
    xt[:, :batch] = x.t()
    if not transposed:
        functions["matmul", *key](*weight, xt.data_ptr(), out.data_ptr(), out_features, batch, stride)
        return out
    yt = x.new_empty((out_features, stride))
    functions["scatterb", *key](*weight, xt.data_ptr(), yt.data_ptr(), in_features, out_features, stride)
    return out.copy_(yt[:, :batch].t())


relative_linear = torch.library.custom_op("fxcompress::relative_linear", relative_linear_eager, mutates_args=())


@relative_linear.register_fake
def _(x, crow, gaps, values, codes, codebook, bias, in_features, out_features, transposed):
    return x.new_empty((x.shape[0], out_features))


def _relative_backward(ctx, grad):
    crow, gaps, values, codes, codebook = ctx.saved_tensors
    if ctx.transposed:  # a temporary CSR of the [in, out] matrix: dx = grad @ W = (W^T grad^T)^T
        weight = relative_csr(crow, gaps, values, codes, codebook, (ctx.in_features, ctx.out_features))
        dx = torch.mm(weight, grad.t().contiguous()).t().contiguous()
    else:  # a temporary CSR: training through a lowered layer is rare
        weight = relative_csr(crow, gaps, values, codes, codebook, (ctx.out_features, ctx.in_features))
        dx = torch.mm(weight.t(), grad.t().contiguous()).t().contiguous()
    return dx, None, None, None, None, None, None, None, None, None


def _relative_save(ctx, inputs, output):
    _, crow, gaps, values, codes, codebook, _, in_features, out_features, transposed = inputs
    ctx.save_for_backward(crow, gaps, values, codes, codebook)
    ctx.in_features, ctx.out_features, ctx.transposed = in_features, out_features, transposed


relative_linear.register_autograd(_relative_backward, setup_context=_relative_save)


def _scipy_weight(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int,
                  out_features: int, kernel: str) -> scipy.sparse.spmatrix:
    """A scipy view [out, in] of the buffers (their memory, no copy; the buffers were checked when
    built): CSR, or for "scipy_csc" the transpose of the [in, out] CSR they describe."""
    import scipy.sparse  # here, not at the top: `import fxcompress` skips scipy (about 0.4 s) until it is used
    matrix = scipy.sparse.csr_matrix(compressed_shape(kernel, in_features, out_features), dtype=values.numpy().dtype)
    matrix.data, matrix.indices, matrix.indptr = values.numpy(), col.numpy(), crow.numpy()
    return matrix.T if kernel == "scipy_csc" else matrix


def compressed_shape(kernel: str, in_features: int, out_features: int) -> tuple[int, int]:
    """The shape of the matrix a kernel's CSR / BSR buffers describe: the weight's, or its transpose."""
    return (in_features, out_features) if kernel in TRANSPOSED else (out_features, in_features)


class SparseLayer(nn.Module):
    """A linear / conv2d layer computed from one stored form of its weight (`kernel`).

    Buffers: "dense" holds `weight`; the sparse kernels hold `crow_indices` / `col_indices` (int32)
    and `values` ([nnz] for CSR, [blocks, b, b] for BSR) of the weight as a matrix [out, in * kh * kw];
    "c_relative" holds `crow_indices`, `gaps` (`gap_dtype`) and either `values` or, with `shared`,
    `codes` (uint8) and `codebook` (float32) (see `relative_form`), "c_relative_csc" the same of the
    transposed matrix [in * kh * kw, out]; `bias` when the layer has one. `kernel_choice` is the measurement that picked the kernel
    (None when the kernel was set by hand): times in milliseconds per call for each candidate.
    """

    def __init__(self, kind: str, weight_shape: Sequence[int], kernel: str, has_bias: bool = True,
                 blocksize: int | None = None, times_ms: Mapping[str, float] | None = None,
                 stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                 dilation: Sequence[int] = (1, 1), dtype: str = "float32", gap_dtype: str | None = None,
                 shared: bool = False) -> None:
        super().__init__()
        _check_relative_config(kernel, gap_dtype, shared, dtype)  # first: it says what our C kernels need
        _check_config(kind, weight_shape, kernel, blocksize, dtype)
        self.kind, self.weight_shape, self.kernel = kind, [int(s) for s in weight_shape], kernel
        self.has_bias, self.blocksize, self.dtype = has_bias, blocksize, dtype
        self._dtype = getattr(torch, dtype)  # forward's one check on every call: an identity test, not a lookup
        self.gap_dtype, self.shared = gap_dtype, shared
        self._features = (self.in_features, self.out_features)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.kernel_choice = None if times_ms is None else KernelChoice.from_stats({"kernel": kernel,
                                                                                    "times_ms": times_ms})
        value_dtype = getattr(torch, dtype)
        if kernel == "dense":
            self.register_buffer("weight", torch.zeros(0, dtype=value_dtype))
        elif kernel in RELATIVE:
            self._relative_slots(value_dtype)
        else:
            self.register_buffer("crow_indices", torch.zeros(0, dtype=INDEX_DTYPE))
            self.register_buffer("col_indices", torch.zeros(0, dtype=INDEX_DTYPE))
            self.register_buffer("values", torch.zeros(0, dtype=value_dtype))
        if has_bias:
            self.register_buffer("bias", torch.zeros(0, dtype=value_dtype))
        else:
            self.bias = None
        self._where = "SparseLayer"

    def _relative_slots(self, value_dtype: torch.dtype) -> None:
        """Empty c_relative buffers of the configured dtypes (filled by _store or a file)."""
        self.register_buffer("crow_indices", torch.zeros(0, dtype=INDEX_DTYPE))
        self.register_buffer("gaps", torch.zeros(0, dtype=GAP_DTYPES[self.gap_dtype]))
        if self.shared:
            self.register_buffer("codes", torch.zeros(0, dtype=torch.uint8))
            self.register_buffer("codebook", torch.zeros(0, dtype=value_dtype))
        else:
            self.register_buffer("values", torch.zeros(0, dtype=value_dtype))

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of the weight as a matrix: input channels times the kernel's positions."""
        return math.prod(self.weight_shape[1:])

    @classmethod
    def from_dense(cls, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str,
                   conv: Mapping[str, Sequence[int]] | None = None,
                   times_ms: Mapping[str, float] | None = None, share: bool = False) -> "SparseLayer":
        """The layer in form `kernel`, built from its dense weight (which a sparse form does not keep;
        a dense form keeps a copy, or with `share` the tensor itself: a temporary no one else holds)."""
        dtype = str(weight.dtype).removeprefix("torch.")
        blocksize = bsr_blocksize(weight) if kernel == "torch_bsr" else None
        if kernel == "torch_bsr" and blocksize is None:
            raise PreconditionError(f"SparseLayer: no block size of {BSR_BLOCKS} divides weight "
                                    f"{list(weight.shape)} with blocks at least {BSR_MIN_FILL:.0%} full")
        if kernel in RELATIVE:
            return cls._relative(kind, weight.detach(), None if bias is None else bias.detach(), kernel, conv,
                                 times_ms)
        module = cls(kind, list(weight.shape), kernel, bias is not None, blocksize, times_ms, **(conv or {}),
                     dtype=dtype)
        module._store(weight.detach(), None if bias is None else bias.detach(), share)
        return module

    @classmethod
    def _relative(cls, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str,
                  conv: Mapping[str, Sequence[int]] | None, times_ms: Mapping[str, float] | None) -> "SparseLayer":
        """The layer in one of our C kernels' forms (`relative_form` of the weight matrix or its transpose)."""
        if weight.dtype != torch.float32:
            raise PreconditionError(f"SparseLayer: kernel {kernel!r} multiplies float32 weights, got {weight.dtype}")
        if kernel == "c_relative_csc" and not bool(torch.isfinite(weight).all()):
            raise PreconditionError("SparseLayer: kernel 'c_relative_csc' skips zero inputs, which is exact only "
                                    "for finite weights; this weight holds inf or nan")
        matrix = weight.reshape(weight.shape[0], -1)
        form = relative_form(matrix.t() if kernel in TRANSPOSED else matrix)
        gap_dtype = "uint8" if form["gaps"].dtype == torch.uint8 else "uint16"
        module = cls(kind, list(weight.shape), kernel, bias is not None, None, times_ms, **(conv or {}),
                     dtype="float32", gap_dtype=gap_dtype, shared="codes" in form)
        for name, tensor in form.items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = bias.clone().contiguous()
        return module

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None, share: bool = False) -> None:
        matrix = weight.reshape(weight.shape[0], -1)
        matrix = matrix.t() if self.kernel in TRANSPOSED else matrix
        if self.kernel == "dense":
            self.weight = weight.contiguous() if share else weight.clone().contiguous()
        else:
            with warnings.catch_warnings():  # torch calls its sparse CSR support beta: we check the results
                warnings.simplefilter("ignore", UserWarning)
                sparse = matrix.to_sparse_bsr((self.blocksize,) * 2) if self.blocksize else matrix.to_sparse_csr()
            self.crow_indices = sparse.crow_indices().to(INDEX_DTYPE)
            self.col_indices = sparse.col_indices().to(INDEX_DTYPE)
            self.values = sparse.values().clone()  # not a view: its base would be the sparse tensor
        if bias is not None:
            self.bias = bias.clone().contiguous()

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (a temporary: for re-measuring and checks, never kept)."""
        if self.kernel == "dense":
            return self.weight
        shape = compressed_shape(self.kernel, self.in_features, self.out_features)
        if self.kernel in RELATIVE:
            matrix = relative_csr(*self._relative_tensors(), shape).to_dense()
        else:
            make = torch.sparse_bsr_tensor if self.blocksize else torch.sparse_csr_tensor
            matrix = make(self.crow_indices, self.col_indices, self.values, shape, check_invariants=True).to_dense()
        return (matrix.t() if self.kernel in TRANSPOSED else matrix).reshape(self.weight_shape)

    def dense_module(self) -> nn.Module:
        """The nn.Linear / nn.Conv2d this layer computes, with its dense weight (`fxcompress.decode`)."""
        bias = self.bias is not None
        if self.kind == "linear":
            dense = nn.Linear(self.in_features, self.out_features, bias=bias)
        else:
            out, channels, *kernel_size = self.weight_shape
            dense = nn.Conv2d(channels, out, kernel_size, self.stride, self.padding, self.dilation, bias=bias)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if bias:
                dense.bias.copy_(self.bias)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not self._dtype:  # the kernels would raise torch's or scipy's error, or (C) read garbage
            raise PreconditionError(self._dtype_refusal(x.dtype))
        if self.kernel == "dense":
            if self.kind == "linear":
                return F.linear(x, self.weight, self.bias)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.kernel in RELATIVE and x.dim() == 2 and self.kind == "linear" and _plain_eager(x):
            buffers = self._buffers  # the common case, with nothing between the call and the kernel
            return relative_linear_eager(x, buffers["crow_indices"], buffers["gaps"], buffers.get("values"),
                                         buffers.get("codes"), buffers.get("codebook"), buffers.get("bias"),
                                         *self._features, self.kernel == "c_relative_csc")
        if self.kind == "linear":
            out = self._matmul(x.reshape(-1, self.in_features))
            return out.reshape(*x.shape[:-1], self.out_features)
        return self._conv(x)

    def _dtype_refusal(self, dtype: torch.dtype) -> str:
        """Why an input of `dtype` is refused, and what to do."""
        name = str(dtype).removeprefix("torch.")
        multiplies = [str(d).removeprefix("torch.") for d in KERNEL_DTYPES[self.kernel]]
        hint = "" if name in multiplies else (f" (this kernel multiplies {', '.join(multiplies)} only: to run in "
                                              f"{name}, remeasure the converted model)")
        return (f"{self._where}: kernel {self.kernel!r} holds {self.dtype} weights and takes {self.dtype} inputs "
                f"only, got a {name} input; convert the input{hint} or the model")

    def _relative_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """crow_indices, gaps, values, codes, codebook (None where this form has none)."""
        return (self.crow_indices, self.gaps, self._buffers.get("values"), self._buffers.get("codes"),
                self._buffers.get("codebook"))

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        eager = _plain_eager(rows)
        if self.kernel in RELATIVE:
            args = (rows, *self._relative_tensors(), self.bias, self.in_features, self.out_features,
                    self.kernel == "c_relative_csc")
            return relative_linear_eager(*args) if eager else torch.ops.fxcompress.relative_linear(*args)
        args = (rows, self.crow_indices, self.col_indices, self.values, self.bias, self.in_features,
                self.out_features, self.kernel)
        if eager:
            return sparse_linear_eager(*args)  # plain eager inference: no op dispatch
        return torch.ops.fxcompress.sparse_linear(*args)  # traced (fake / proxy tensors) or differentiated

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """im2col, one sparse matmul over every output position of every image, back to N x C x H x W."""
        if x.dim() == 3:  # an unbatched image (C, H, W), which F.conv2d (the dense form) accepts too
            return self._conv(x.unsqueeze(0)).squeeze(0)
        kh, kw = self.weight_shape[2:]
        batch, height, width = x.shape[0], *_conv_out(x.shape[2:], (kh, kw), self.stride, self.padding,
                                                     self.dilation)
        cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)
        out = self._matmul(cols.transpose(1, 2).reshape(-1, self.in_features))
        return out.reshape(batch, height * width, self.out_features).transpose(1, 2).reshape(
            batch, self.out_features, height, width)

    def held_bytes(self) -> int:
        """Bytes of the tensors this layer holds (its weight in the chosen form, and the bias)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def nonzeros(self) -> int:
        if self.kernel == "dense":
            return int(torch.count_nonzero(self.weight))
        if self.kernel in RELATIVE:  # fillers are zeros
            return int(torch.count_nonzero(relative_values(*self._relative_tensors()[2:])))
        return int(torch.count_nonzero(self.values))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight_shape": list(self.weight_shape), "kernel": self.kernel,
                "has_bias": self.has_bias, "blocksize": self.blocksize,
                "times_ms": None if self.kernel_choice is None else dict(self.kernel_choice.as_stats()["times_ms"]),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "dtype": self.dtype, "gap_dtype": self.gap_dtype, "shared": self.shared}

    def extra_repr(self) -> str:
        chosen = "" if self.kernel_choice is None else f", {self.kernel_choice.ms:.3f} ms"
        return f"{self.kind}, weight={tuple(self.weight_shape)}, kernel={self.kernel}{chosen}"

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        """Check the tensors a file attached: dtypes, shapes, and every CSR / BSR index in range (scipy
        reads them unchecked). Raises FormatError naming `path` and the tensor."""
        self._where = f"SparseLayer {path}"
        value_dtype = getattr(torch, self.dtype)
        if self.has_bias:
            _expect(self, "bias", value_dtype, (self.out_features,))
        if self.kernel == "dense":
            _expect(self, "weight", value_dtype, tuple(self.weight_shape))
            return
        if self.kernel in RELATIVE:
            self._check_relative(value_dtype)
            return
        block = self.blocksize or 1
        rows, columns = compressed_shape(self.kernel, self.in_features, self.out_features)
        _expect(self, "crow_indices", INDEX_DTYPE, (rows // block + 1,))
        count = self.col_indices.shape[0] if self.col_indices.dim() == 1 else -1
        _expect(self, "col_indices", INDEX_DTYPE, (count,))
        _expect(self, "values", value_dtype, (count, block, block) if self.blocksize else (count,))
        _check_indices(self._where, self.crow_indices, self.col_indices, columns // block)

    def adopt(self, other: "SparseLayer") -> None:
        """Take `other`'s form and measurement (re-measuring swaps the form of a layer in place)."""
        for name in ("weight", "crow_indices", "col_indices", "values", *RELATIVE_BUFFERS):
            if name in self._buffers:
                del self._buffers[name]
        for name, tensor in other._buffers.items():
            self._buffers[name] = tensor
        self.kernel, self.blocksize, self.kernel_choice = other.kernel, other.blocksize, other.kernel_choice
        self.gap_dtype, self.shared, self.dtype, self._dtype = other.gap_dtype, other.shared, other.dtype, other._dtype

    def _apply(self, fn, recurse=True):
        """Convert or move the layer's tensors as `fn` says, except to a float dtype its kernel cannot
        multiply (KERNEL_DTYPES): those keep theirs (moved, where `fn` moves them), so `model.double()` on a
        c_relative layer does not hand float64 memory to a kernel reading float32."""
        holds = KERNEL_DTYPES[self.kernel]

        def converted(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype is not t.dtype and out.is_floating_point() and out.dtype not in holds:
                return t if out.device == t.device else t.to(out.device)
            return out
        result = super()._apply(converted, recurse)
        value = self._buffers.get("weight" if self.kernel == "dense" else
                                  "codebook" if self.shared else "values")
        if value is not None and value.dtype is not self._dtype and value.is_floating_point():
            self.dtype, self._dtype = str(value.dtype).removeprefix("torch."), value.dtype  # files keep it
        return result

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_dtype" not in state:  # pickled before the attribute existed
            self._dtype = getattr(torch, self.dtype)

    def _check_relative(self, value_dtype: torch.dtype) -> None:
        """c_relative's tensors: row pointers, every row's columns inside the layer, codes inside the
        codebook; where no C compiler exists here, the layer switches to scipy's CSR (with a warning)."""
        rows, columns = compressed_shape(self.kernel, self.in_features, self.out_features)
        _expect(self, "crow_indices", INDEX_DTYPE, (rows + 1,))
        count = self.gaps.shape[0] if self.gaps.dim() == 1 else -1
        _expect(self, "gaps", GAP_DTYPES[self.gap_dtype], (count,))
        if self.shared:
            _expect(self, "codes", torch.uint8, (count,))
            size = self.codebook.shape[0] if self.codebook.dim() == 1 else -1
            _expect(self, "codebook", value_dtype, (size,))
            if size > CODEBOOK_MAX or (count and (size == 0 or int(self.codes.max()) >= size)):
                raise FormatError(f"{self._where}: tensor 'codes' indexes outside its codebook of {size} entries")
        else:
            _expect(self, "values", value_dtype, (count,))
        _check_pointers(self._where, self.crow_indices, count)
        found = relative_columns(self.crow_indices, self.gaps)
        if found.numel() and int(found.max()) >= columns:
            raise FormatError(f"{self._where}: tensor 'gaps' runs a row past its {columns} columns")
        if self.kernel == "c_relative_csc" and not bool(torch.isfinite(relative_values(*self._relative_tensors()[2:])).all()):
            raise FormatError(f"{self._where}: tensor '{'codebook' if self.shared else 'values'}' holds inf or nan "
                              "(c_relative_csc skips zero inputs: exact for finite weights only)")
        if not relative_available():
            warnings.warn(f"{self._where}: no C compiler here for kernel {self.kernel!r}; running scipy_csr instead "
                          "(remeasure to choose again)", stacklevel=2)
            self.adopt(SparseLayer.from_dense(self.kind, self.dense_weight(), self.bias, "scipy_csr",
                                              {"stride": self.stride, "padding": self.padding,
                                               "dilation": self.dilation} if self.kind == "conv2d" else None))


def _check_config(kind: str, weight_shape: Sequence[int], kernel: str, blocksize: int | None, dtype: str) -> None:
    """A configuration read from a file is checked before anything is built from it."""
    dims = 2 if kind == "linear" else 4
    dtypes = [str(d).removeprefix("torch.") for d in KERNEL_DTYPES.get(kernel, ())]
    if (kind not in KINDS or kernel not in KERNELS or dtype not in dtypes
            or len(weight_shape) != dims or not all(isinstance(s, int) and s > 0 for s in weight_shape)):
        raise ConfigError(f"SparseLayer: kind must be one of {KINDS}, kernel one of {KERNELS}, dtype one of those "
                          f"the kernel multiplies ({' / '.join(dtypes) or 'none'}) and weight_shape {dims} positive "
                          f"sizes; got kind={kind!r}, kernel={kernel!r}, dtype={dtype!r}, "
                          f"weight_shape={list(weight_shape)!r}")
    rows, cols = weight_shape[0], math.prod(weight_shape[1:])
    if (blocksize is not None) != (kernel == "torch_bsr") or (
            blocksize is not None and (blocksize not in BSR_BLOCKS or rows % blocksize or cols % blocksize)):
        raise ConfigError(f"SparseLayer: blocksize {blocksize!r} does not fit kernel {kernel!r} and weight "
                          f"{list(weight_shape)} (torch_bsr needs one of {BSR_BLOCKS} dividing both sides)")


def _plain_eager(x: torch.Tensor) -> bool:
    """Plain eager inference: the kernels are called directly; traced (fake / proxy tensors) or
    differentiated calls go through the custom ops."""
    return type(x) is torch.Tensor and not (x.requires_grad and torch.is_grad_enabled()) and \
        not torch.compiler.is_compiling()


def _check_relative_config(kernel: str, gap_dtype: str | None, shared: bool, dtype: str) -> None:
    relative = kernel in RELATIVE
    if shared not in (True, False) or (gap_dtype in GAP_DTYPES) != relative or (shared and not relative) or (
            relative and dtype != "float32"):
        raise ConfigError(f"SparseLayer: gap_dtype {gap_dtype!r} and shared {shared!r} do not fit kernel {kernel!r} "
                          f"and dtype {dtype!r} (c_relative needs gap_dtype one of {sorted(GAP_DTYPES)} and "
                          "float32; other kernels take neither)")


def _expect(module: SparseLayer, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = module._buffers.get(name)
    if tensor is None or tensor.dtype != dtype or tensor.device.type == "meta" or tuple(tensor.shape) != shape \
            or not tensor.is_contiguous():
        got = "nothing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)} on {tensor.device}"
        raise FormatError(f"{module._where}: tensor {name!r} is {got}, expected contiguous {dtype} {list(shape)}")


def _check_pointers(where: str, crow: torch.Tensor, entries: int) -> None:
    steps = crow[1:] - crow[:-1]
    if int(crow[0]) != 0 or int(crow[-1]) != entries or bool((steps < 0).any()):
        raise FormatError(f"{where}: tensor 'crow_indices' is not a row-pointer array (starts at 0, never "
                          f"decreases, ends at the {entries} stored entries)")


def _check_indices(where: str, crow: torch.Tensor, col: torch.Tensor, columns: int) -> None:
    _check_pointers(where, crow, col.numel())
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= columns):
        raise FormatError(f"{where}: tensor 'col_indices' holds a column outside [0, {columns})")


def _conv_out(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> tuple[int, int]:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation))


def bsr_blocksize(weight: torch.Tensor) -> int | None:
    """The largest block size of BSR_BLOCKS dividing the weight matrix whose nonzero blocks are at
    least BSR_MIN_FILL full; None when none is (unstructured sparsity leaves blocks nearly empty)."""
    matrix = weight.detach().reshape(weight.shape[0], -1) != 0
    nonzeros = int(matrix.sum())
    for block in BSR_BLOCKS:
        rows, cols = matrix.shape
        if rows % block or cols % block or not nonzeros:
            continue
        blocks = matrix.reshape(rows // block, block, cols // block, block).any(dim=(1, 3)).sum()
        if nonzeros / (int(blocks) * block * block) >= BSR_MIN_FILL:
            return block
    return None


def candidate_kernels(weight: torch.Tensor, allowed: Sequence[str]) -> list[str]:
    """The kernels worth timing for this weight: dense always, the others where they multiply its dtype
    (KERNEL_DTYPES), BSR only with full enough blocks, our C kernels where their library builds."""
    return ["dense"] + [k for k in allowed if k in SPARSE_KERNELS and weight.dtype in KERNEL_DTYPES[k]
                        and (k != "torch_bsr" or bsr_blocksize(weight) is not None)
                        and (k not in RELATIVE or relative_available())]


def choose_form(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                allowed: Sequence[str], *, conv: Mapping[str, Sequence[int]] | None = None, repeats: int = 7,
                margin: float = 1.05, clock: str = "wall") -> SparseLayer:
    """Build every candidate form of the layer, time them on its real input `x` (interleaved medians,
    dense kept unless a sparse form is `margin` times faster) and return the chosen one, which
    records the measurement; the other forms are dropped. A dense choice holds `weight` itself."""
    if x.device.type != "cpu":  # scipy multiplies numpy arrays: host memory only
        allowed = [k for k in allowed if not k.startswith("scipy")]
    # the dense form shares `weight` (a temporary of the caller's): a second copy of a 400 MB layer is avoided
    forms = {k: SparseLayer.from_dense(kind, weight, bias, k, conv, share=True)
             for k in candidate_kernels(weight, allowed)}
    choice = choose_kernel({k: m.forward for k, m in forms.items()}, (x,), baseline="dense", repeats=repeats,
                           margin=margin, clock=clock)
    chosen = forms[choice.kernel]
    chosen.kernel_choice = KernelChoice.from_stats(choice.as_stats())  # as stats, history and files hold it
    return chosen


def remeasure_layer(layer: SparseLayer, x: torch.Tensor, allowed: Sequence[str] = SPARSE_KERNELS, *,
                    repeats: int = 7, margin: float = 1.05, clock: str = "wall") -> KernelChoice:
    """Time every form of `layer` again on input `x` (another machine, another batch size) and switch
    it, in place, to the fastest form."""
    conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    weight, bias = layer.dense_weight(), layer.bias
    if x.is_floating_point() and x.dtype is not weight.dtype:  # a converted model: forms for the dtype it runs in
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    with torch.no_grad():
        chosen = choose_form(layer.kind, weight, bias, x, allowed,
                             conv=conv if layer.kind == "conv2d" else None, repeats=repeats, margin=margin,
                             clock=clock)
    layer.adopt(chosen)
    return chosen.kernel_choice


def remeasure(gm: nn.Module, example_inputs: tuple, allowed: Sequence[str] = SPARSE_KERNELS, *,
              repeats: int = 7, margin: float = 1.05, clock: str = "wall") -> dict[str, dict[str, Any]]:
    """Re-time and re-choose the kernel of every SparseLayer of `gm` on `example_inputs` (a model
    loaded on another machine); returns {module path: {"kernel", "times_ms"}}."""
    if not isinstance(example_inputs, tuple):
        raise ConfigError(f"remeasure: example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    layers = {path: m for path, m in gm.named_modules() if isinstance(m, SparseLayer)}
    if not layers:
        raise ConfigError("remeasure: the model holds no SparseLayer (lower it with LowerToSparse first)")
    chosen: dict[str, dict[str, Any]] = {}

    def choose_here(layer: SparseLayer, args: tuple, path: str) -> None:
        # chosen as the run reaches it, before it runs: a layer whose kernel cannot take the input's dtype (a
        # c_relative layer of a model converted with .double()) gets a form that can, rather than failing the run
        if path not in chosen:
            chosen[path] = remeasure_layer(layer, args[0], allowed, repeats=repeats, margin=margin,
                                           clock=clock).as_stats()

    run_reaching(gm, layers, choose_here, example_inputs)
    return {path: chosen[path] for path in layers if path in chosen}
