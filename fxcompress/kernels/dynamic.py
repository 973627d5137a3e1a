"""Dynamic int8 linear layers: int8 weights per output channel, activations quantized at run time.

`DynamicInt8Linear` holds symmetric int8 weight codes (zero-point 0) with one float scale per output
channel, and the float bias. Each call quantizes its input on the fly and multiplies in integers:

- "fbgemm": torch.ao's `quantize_dynamic` kernel (`torch.ops.quantized.linear_dynamic`): the input
  on one uint8 grid per call (its min-max range, 7-bit with `reduce_range` as torch.ao does on x86,
  where uint8 x int8 products are added in int16 pairs without VNNI), int32 accumulation, float output;
  with one input row per call (decoding) that grid is the row's own;
- "int_mm": the input on a symmetric int8 grid per row (max |x| / 127), `torch._int_mm` (int8 x int8
  -> int32), then both scales and the bias in float;
- "float": the weight dequantized on the fly in slices and torch's matmul (no activation rounding;
  kept where int8 loses; holds no float weight between calls).

The packed fbgemm weight and the transposed int8 matrix are built on first use, never stored. The
choice, its times and `remeasure` are `timing.MeasuredLayer`'s. A token embedding tied to the layer
(GPT-2's `wte` and LM head) becomes a `DynamicInt8Embedding` gathering rows of the same int8 codes.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from .timing import FLOAT, Kernel, KernelChoice, MeasuredLayer, Rows
from .weight_only import TiedEmbedding, expect_tensor, keeping_float32


class DynamicInt8Linear(MeasuredLayer):
    """A linear layer with int8 weight codes [out, in] (`weight`), scales per output channel
    (`weight_scale`) and a float bias, whose input is quantized at run time by the chosen kernel."""

    def __init__(self, in_features: int, out_features: int, kernel: str = "float", has_bias: bool = True,
                 times_ms: Mapping[str, float] | None = None) -> None:
        super().__init__()
        sizes = (in_features, out_features)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes) or kernel not in KERNELS:
            raise ConfigError(f"DynamicInt8Linear: needs positive in_features / out_features and kernel one of "
                              f"{tuple(KERNELS)}; got {in_features!r}, {out_features!r}, kernel={kernel!r}")
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias
        self._init_kernel(kernel, times_ms)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   kernel: str = "float") -> "DynamicInt8Linear":
        """The layer from int8-range codes [out, in] (zero-point 0), scales [out] and its float bias."""
        if float(codes.min()) < -128 or float(codes.max()) > 127:
            raise ConfigError("DynamicInt8Linear: weight codes must lie in [-128, 127] (a symmetric 8-bit grid)")
        module = cls(codes.shape[1], codes.shape[0], kernel, bias is not None)
        module.weight.copy_(codes.to(torch.int8))
        module.weight_scale.copy_(scale.reshape(-1).float())
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        return dequantize_int8(self.weight[start:stop], self.weight_scale[start:stop])

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "has_bias": self.has_bias,
                **self.choice_config()}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.choice_repr()}"

    def _apply(self, fn, recurse=True):
        return super()._apply(keeping_float32(fn), recurse)  # float32 scales and bias, whatever the model's dtype

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        self._where = f"DynamicInt8Linear {path}"
        expect_tensor(self, "weight", torch.int8, (self.out_features, self.in_features))
        expect_tensor(self, "weight_scale", torch.float32, (self.out_features,))
        if self.has_bias:
            expect_tensor(self, "bias", torch.float32, (self.out_features,))
        if not bool(torch.isfinite(self.weight_scale).all()) or not bool((self.weight_scale > 0).all()):
            raise FormatError(f"{self._where}: weight scales must be finite and positive")
        self._run = None


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float rows of int8 codes, one scale per row (what the layer and its tied embedding both read)."""
    return weight.float() * scale.unsqueeze(1)


class DynamicInt8Embedding(TiedEmbedding):
    """A token embedding reading the int8 weight of its tied LM head, a DynamicInt8Linear: `weight` and
    `weight_scale` are the head's (one per output channel: one per token row); a lookup dequantizes only
    the rows it reads, with `dequantize_int8` as the head does."""

    HEAD: ClassVar[type] = DynamicInt8Linear
    TIED: ClassVar[tuple[str, ...]] = ("weight", "weight_scale")

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | None = None) -> None:
        super().__init__()
        sizes = (num_embeddings, embedding_dim)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ConfigError(f"DynamicInt8Embedding: needs positive num_embeddings / embedding_dim; got "
                              f"{num_embeddings!r}, {embedding_dim!r}")
        self._init_tie(num_embeddings, embedding_dim, dtype)
        for name, (dtype, shape) in self.expected().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    @classmethod
    def config_for(cls, head: DynamicInt8Linear) -> dict[str, Any]:
        return {"num_embeddings": head.out_features, "embedding_dim": head.in_features}

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {"weight": (torch.int8, (self.num_embeddings, self.embedding_dim)),
                "weight_scale": (torch.float32, (self.num_embeddings,))}

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        rows = dequantize_int8(self.weight.index_select(0, flat), self.weight_scale.index_select(0, flat))
        return self.rows_in_dtype(rows).reshape(*indices.shape, self.embedding_dim)

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, **self.dtype_config()}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the tied head's int8 weight"


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm(module: DynamicInt8Linear) -> Rows:
    scale = module.weight_scale.double()
    with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm's prepack still takes only them
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(module.weight, scale,
                                                           torch.zeros_like(scale, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(qweight, module.bias)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The matrix `t` with row-major strides written out: torch counts a [1, n] tensor with strides (1, 1) (the
    transpose of an [n, 1] weight) as contiguous, and `torch._int_mm` then reads its rows 1 element apart (a
    Linear(1, 16) gave errors of 10^4 times its outputs). Checked on every call's codes: a stride comparison,
    not a meta tensor's strides (4 us a call)."""
    return t if t.stride() == (t.shape[1], 1) else t.clone(memory_format=torch.contiguous_format)


def _int_mm(module: DynamicInt8Linear) -> Rows:
    weight_t, scale, bias = _row_major(module.weight.t().contiguous()), module.weight_scale, module.bias

    def run(x: torch.Tensor) -> torch.Tensor:
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127
        codes = _row_major(torch.round(x / x_scale).to(torch.int8))
        out = torch._int_mm(codes, weight_t).float().mul_(x_scale).mul_(scale)
        return out if bias is None else out.add_(bias)
    return run


KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (
    FLOAT,
    Kernel("fbgemm", lambda m: None if fbgemm_available() else "this torch build has no fbgemm", _fbgemm),
    Kernel("int_mm", lambda m: None if hasattr(torch, "_int_mm") else "this torch has no _int_mm", _int_mm),
)}
DynamicInt8Linear.KERNELS = KERNELS  # the table names the kernel functions, which are defined after the class
QUANTIZED_KERNELS = tuple(name for name in KERNELS if name != "float")
ACTIVATION_GRIDS = {"float": "none", "fbgemm": "uint8 per call (min-max, 7-bit: reduce_range)",
                    "int_mm": "int8 per row (symmetric, max |x| / 127)"}


def refusals(kernels: Sequence[str] = QUANTIZED_KERNELS) -> dict[str, str]:
    """Why each of `kernels` cannot run on this machine (kernels that can are absent)."""
    return {name: reason for name in kernels if (reason := KERNELS[name].refusal(None)) is not None}


def choose(module: DynamicInt8Linear, x: torch.Tensor, kernels: Sequence[str] = QUANTIZED_KERNELS, *,
           repeats: int = 7, margin: float = 1.05, cold: bool = False) -> KernelChoice:
    """Time the float layer, the float kernel and each allowed int8 kernel on input `x`; set the fastest
    (the float kernel unless beaten by `margin`) as the module's kernel; `cold`: see `timing.measure`."""
    return module.choose(x, kernels, repeats=repeats, margin=margin, cold=cold)
