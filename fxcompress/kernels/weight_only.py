"""Weight-only quantized linear layers: integer weight codes, float activations, chosen kernel.

A `WeightOnlyLinear` computes `F.linear(x, W, b)` where W is held only as integer codes u with one
scale s and zero-point z per (output channel, group of `group_size` input channels):
W = (u - z) * s. Codes are unsigned (u = q - qmin of the fake-quant grid): one per byte for grids of
5..8 bits, two per byte for grids of at most 4 bits, in one of two packings (`PACKINGS`):
"blocks" (chosen when lowering wherever in_features is a multiple of 32: in each block of 32 columns,
byte j holds column j in its low nibble and column j + 16 in its high one, which the C kernel unpacks
with one mask and one shift per 32 codes) or "pairs" (column 2j low, 2j + 1 high: files written
before "blocks" existed).

Each kernel computes from the codes; none keeps a float weight between calls:

- "float": dequantizes slices of output channels on every call (4 MB of float weight at most) and
  multiplies them with torch's matmul — the layer everywhere, slow at batch 1;
- "c_gemv": our C kernel (csrc/wo_gemv.c, built at first use where a C compiler exists): unpacks
  each block of 32 codes once per call and multiplies it with every input row, float32 accumulators
  per group scaled once per group; for decoding (1..8 rows), where the bytes read decide. Needs
  groups of a multiple of 32 columns (and "blocks" packing for 4-bit codes);
- "int8pack": `torch._weight_int8pack_mm`, int8 codes centered on a zero-point that fits int8
  (symmetric 8-bit grids), one scale per output channel (holds its int8 copy of the codes);
- "int4pack": `torch._weight_int4pack_mm_for_cpu` (tinygemm's layout: W = (u - 8) * s + zero per
  group of 32..256), grids of at most 4 bits whose groups it can tile (holds its packed copy);
- "fbgemm_fp16": fbgemm's fp16-weight GEMM on the centered integer codes u - z (exact in fp16, which
  holds every integer up to 2048), with the scales applied after: one output row per group (the input
  split block-diagonally by group), scaled and summed (holds its fp16 copy: 2 bytes a weight).

A token embedding whose table is a lowered layer's weight (GPT-2's `wte`, tied to its LM head) becomes a
`WeightOnlyEmbedding` (a `TiedEmbedding`): it holds the head's own codes, scales and zero-points, no copy,
and dequantizes only the rows its token ids read.

Which kernel wins depends on the machine and the input shape (on an AVX2 machine without AVX-512,
torch's int8pack / int4pack ran 10-60x slower than fp32 at batch 1), so `choose` times every kernel
that fits on the layer's real input, beside the float layer it replaced (`timing.MeasuredLayer`).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, FormatError, PreconditionError
from ..quant.quantizers import GroupedCodes
from .compiled import library
from .timing import FLOAT, Kernel, KernelChoice, MeasuredLayer, Rows

INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4pack kernel takes, largest first
INT4_N_MULTIPLE = 16              # its packed layout needs output channels in multiples of 16
FP16_EXACT = 2048                 # every integer of magnitude up to this is exact in fp16
C_BLOCK = 32                      # columns the C kernel unpacks at once (csrc/wo_gemv.c: BLOCK)
RENAMED = {"dequantize": "float"}  # kernels files may name that are now another: the float kernel dequantizes
# the dtypes a tied embedding's rows follow a model's conversion to (`.double()`, `.half()`)
ROW_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
              "bfloat16": torch.bfloat16}


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [rows, 2n] -> [rows, n], column 2j in the low nibble, 2j + 1 in the high one."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def pack_blocks(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [rows, 32n] -> [rows, 16n]: in each block of 32 columns, byte j holds column j
    (low nibble) and column j + 16 (high nibble)."""
    blocks = codes.reshape(codes.shape[0], -1, 2, C_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def unpack_blocks(packed: torch.Tensor) -> torch.Tensor:
    blocks = packed.reshape(packed.shape[0], -1, C_BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(packed.shape[0], -1)


def keeping_float32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Module._apply conversion `fn` that leaves float32 tensors float32 (moved where `fn` moves them).

    The lowered layers hold integer codes with float32 scales and bias, which their kernels read as
    float32 (the C kernel by address: float64 scales there gave outputs of 1e21), while their forward
    takes inputs of every float dtype and returns that dtype; so `model.double()` / `.half()` converts
    the model around them and nothing in them. A float32 tensor is returned itself where only its dtype
    would change, so a lowered head and its tied embedding keep sharing one tensor."""
    def converted(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype is torch.float32 and out.dtype is not torch.float32:
            return t if out.device == t.device else t.to(out.device)
        return out
    return converted


# packing name -> (pack, unpack) of 4-bit codes [rows, in] <-> [rows, in / 2]
PACKINGS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "pairs": (pack_nibbles, unpack_nibbles), "blocks": (pack_blocks, unpack_blocks)}


class WeightOnlyLinear(MeasuredLayer):
    """A linear layer held as integer weight codes, run by the kernel `kernel`.

    Buffers: `codes` (uint8: [out, in] for 8-bit storage, [out, in / 2] two codes per byte for 4-bit,
    packed as `packing` says), `scale` (float32 [out, in / group_size]), `zero` (uint8, the same shape:
    zero-points are integers in the codes' range), `bias` (float32 [out]) when the layer has one.
    `kernel_choice` is the measurement that picked the kernel (None when it was set by hand).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, kernel: str = "float",
                 has_bias: bool = True, times_ms: Mapping[str, float] | None = None, packing: str = "pairs") -> None:
        super().__init__()
        kernel = RENAMED.get(kernel, kernel)
        _check_config(in_features, out_features, bits, group_size, kernel, packing)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.has_bias, self.packing = has_bias, packing
        self._init_kernel(kernel, times_ms)
        groups = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    @classmethod
    def from_grouped(cls, grouped: GroupedCodes, bias: torch.Tensor | None, kernel: str = "float",
                     times_ms: Mapping[str, float] | None = None) -> "WeightOnlyLinear":
        """The layer from a fake-quant grid's codes (rows = output channels) and its float bias."""
        levels = grouped.qmax - grouped.qmin
        if levels > 255:
            raise PreconditionError(f"WeightOnlyLinear: a grid of {levels + 1} levels needs more than 8 bits; "
                                    f"weight-only kernels take grids of at most 8 bits")
        out, columns = grouped.codes.shape
        bits = 4 if levels <= 15 and columns % 2 == 0 else 8
        packing = "blocks" if columns % C_BLOCK == 0 else "pairs"
        module = cls(columns, out, bits, grouped.group_size, kernel, bias is not None, times_ms, packing)
        unsigned = (grouped.codes - grouped.qmin).to(torch.uint8)
        module.codes.copy_(PACKINGS[packing][0](unsigned) if bits == 4 else unsigned)
        # a group of zero weights (pruned) keeps a step borrowed from other groups (or 1): any step gives its
        # zeros, but the C kernel computes s * (sum u x - z sum x), whose two terms cancel only up to rounding,
        # so a borrowed step turned exact zeros into noise (1e-3 of the outputs for a pruned layer). Step 0
        # gives exact zeros in every kernel, and (u - z) * 0 is still the fake-quant weight's 0.
        centered = grouped.codes - grouped.zero_point.repeat_interleave(grouped.group_size, dim=1)
        empty = (centered.reshape(out, -1, grouped.group_size) == 0).all(dim=2)
        module.scale.copy_(torch.where(empty, 0.0, grouped.scale))
        module.zero.copy_((grouped.zero_point - grouped.qmin).to(torch.uint8))
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module

    def unsigned_codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The codes u of output channels start..stop as uint8 [rows, in], unpacked."""
        codes = self.codes[start:stop]
        return PACKINGS[self.packing][1](codes) if self.bits == 4 else codes

    def centered(self) -> torch.Tensor:
        """u - z as float32 [out, in]: small integers, exact in float."""
        return self.unsigned_codes().float() - self.zero.float().repeat_interleave(self.group_size, dim=1)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """The float weight of output channels start..stop, bit-identical to the fake-quant weight."""
        return dequantize(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop], self.bits,
                          self.group_size, self.packing)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "has_bias": self.has_bias, "packing": self.packing,
                **self.choice_config()}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {self.choice_repr()}")

    def _apply(self, fn, recurse=True):
        return super()._apply(keeping_float32(fn), recurse)

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        """FormatError naming `path` and the tensor when a file attached tensors of the wrong kind."""
        self._where = f"WeightOnlyLinear {path}"
        groups = (self.out_features, self.in_features // self.group_size)
        expected = {"codes": (torch.uint8, (self.out_features, self.in_features * self.bits // 8)),
                    "scale": (torch.float32, groups), "zero": (torch.uint8, groups)}
        if self.has_bias:
            expected["bias"] = (torch.float32, (self.out_features,))
        for name, (dtype, shape) in expected.items():
            expect_tensor(self, name, dtype, shape)
        if not bool(torch.isfinite(self.scale).all()):
            raise FormatError(f"{self._where}: scales must be finite")
        # int8pack's refusals are the file's, not the machine's (the other kernels' depend on the build): codes
        # whose u - z leave int8, or groups, would load and raise PreconditionError at the first forward
        refusal = _int8pack_refusal(self) if self.kernel == "int8pack" else None
        if refusal is not None:
            raise FormatError(f"{self._where}: kernel 'int8pack' cannot run these tensors: {refusal}")
        self._run = None


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               packing: str) -> torch.Tensor:
    """Float rows (u - z) * s from packed code rows and their groups' scales and zero-points: the fake-quant
    grid's (q - zero_point) * scale, bit for bit (u - z is a small integer, exact in float32)."""
    u = PACKINGS[packing][1](codes) if bits == 4 else codes
    rows = u.shape[0]
    weight = (u.float().reshape(rows, -1, group_size) - zero.float().unsqueeze(2)) * scale.unsqueeze(2)
    return weight.reshape(rows, -1)


class TiedEmbedding(nn.Module):
    """Base of the token embeddings whose table is the weight of a tied LM head lowered to a MeasuredLayer.

    It holds no tensor of its own: the tensors named in `TIED` are the very tensors of the head (`tie`),
    so the running model and the file (which stores a shared tensor once, its second name pointing at
    the first) keep one copy. A subclass gathers the rows of its token ids and dequantizes only those,
    as its head's `dequantize_rows` does; it names the shapes its tensors must have (`expected`) and
    what must match between it and its head (`head_mismatch`). On load `check_loaded` finds the head
    again (the module of type `HEAD` holding these very tensors) or refuses the file.
    """

    HEAD: ClassVar[type] = nn.Module
    TIED: ClassVar[tuple[str, ...]] = ()
    dtype: str | None = None  # see _init_tie (here too for pickles from before it existed)

    def _init_tie(self, num_embeddings: int, embedding_dim: int, dtype: str | None = None) -> None:
        if dtype is not None and dtype not in ROW_DTYPES:
            raise ConfigError(f"{type(self).__name__}: dtype must be None or one of {sorted(ROW_DTYPES)}, "
                              f"got {dtype!r}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # the dtype of the rows it returns, once the model was converted (None: float32, the scales' own): the
        # codes and scales stay as the head reads them, and the rows follow the conversion as the nn.Embedding
        # they replace would (a half model's LayerNorm refuses float32 rows)
        self.dtype = dtype
        self._where = type(self).__name__
        object.__setattr__(self, "_head", None)  # not a child: the head sits at its own path in the model

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def config_for(cls, head: nn.Module) -> dict[str, Any]:  # pragma: no cover - interface
        """The configuration of the embedding whose table is `head`'s weight (rows: its output channels)."""
        raise NotImplementedError

    @classmethod
    def tied_to(cls, head: nn.Module) -> "TiedEmbedding":
        """The embedding reading `head`'s tensors as its table."""
        module = cls(**cls.config_for(head))
        module.tie(head)
        return module

    def head_mismatch(self, head: nn.Module) -> str | None:
        """What differs between this embedding's configuration and the one its head implies, if anything."""
        theirs = self.config_for(head)
        ours = {k: v for k, v in self.config().items() if k != "dtype"}  # the head's scales stay float32 in any case
        return None if ours == theirs else f"{ours} against {theirs}"

    def rows_in_dtype(self, rows: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 rows in the dtype the model was converted to."""
        return rows if self.dtype is None else rows.to(ROW_DTYPES[self.dtype])

    def dtype_config(self) -> dict[str, Any]:
        return {} if self.dtype is None else {"dtype": self.dtype}  # files of unconverted models stay as they were

    def tie(self, head: nn.Module) -> None:
        """Share `head`'s tensors (this module's own placeholders are dropped)."""
        for name in self.TIED:
            self._buffers[name] = head._buffers[name]
        object.__setattr__(self, "_head", head)

    @property
    def head(self) -> nn.Module | None:
        return self._head

    def dense_module(self) -> nn.Module:
        """An nn.Embedding of every row this one gathers, dequantized (`fxcompress.decode`)."""
        with torch.no_grad():
            table = self(torch.arange(self.num_embeddings))
        return nn.Embedding.from_pretrained(table, freeze=False)

    def _apply(self, fn, recurse=True):
        """Moving or converting the model converts the shared tensors once: whichever of the head and this
        module comes first converts them, the other takes the result (a conversion returns a tensor it
        already converted unchanged, so the head converting ours again keeps the tie)."""
        head = self._head
        before = None if head is None else tuple(head._buffers[name] for name in self.TIED)
        rows = fn(torch.empty(0, dtype=ROW_DTYPES[self.dtype or "float32"])).dtype  # what fn makes of a float row
        if str(rows).removeprefix("torch.") in ROW_DTYPES:
            self.dtype = None if rows is torch.float32 else str(rows).removeprefix("torch.")
        result = super()._apply(keeping_float32(fn), recurse)  # the head's scales: float32, as the head keeps them
        if head is not None:
            if any(head._buffers[name] is not old for name, old in zip(self.TIED, before)):
                self.tie(head)  # the head was converted first: take its tensors
            else:
                for name in self.TIED:  # converted here first: the head takes ours
                    head._buffers[name] = self._buffers[name]
                head._run = None
        return result

    def held_bytes(self) -> int:
        """Bytes held beyond the head's: none."""
        return 0

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        """FormatError naming `path` unless its tensors have the table's shapes and are the very tensors of
        one `HEAD` module of `root` that matches it (the file kept the tie)."""
        self._where = f"{type(self).__name__} {path}"
        for name, (dtype, shape) in self.expected().items():
            expect_tensor(self, name, dtype, shape)
        heads = [m for m in (root.modules() if root is not None else ()) if isinstance(m, self.HEAD)
                 and all(m._buffers.get(name) is self._buffers[name] for name in self.TIED)]
        if not heads:
            raise FormatError(f"{self._where}: its tensors {list(self.TIED)} are not those of one "
                              f"{self.HEAD.__name__} of the model (a tied embedding reads its head's weight)")
        mismatch = self.head_mismatch(heads[0])
        if mismatch is not None:
            raise FormatError(f"{self._where}: its configuration does not match its head's: {mismatch}")
        object.__setattr__(self, "_head", heads[0])


class WeightOnlyEmbedding(TiedEmbedding):
    """A token embedding reading the packed weight of its tied LM head, a WeightOnlyLinear: `codes`,
    `scale` and `zero` are the head's; a lookup dequantizes only the rows it reads, as
    `WeightOnlyLinear.dequantize_rows` does, so it returns the fake-quant table's rows exactly."""

    HEAD = WeightOnlyLinear
    TIED = ("codes", "scale", "zero")

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int,
                 packing: str = "blocks", dtype: str | None = None) -> None:
        super().__init__()
        _check_config(embedding_dim, num_embeddings, bits, group_size, "float", packing, "WeightOnlyEmbedding")
        self._init_tie(num_embeddings, embedding_dim, dtype)
        self.bits, self.group_size, self.packing = bits, group_size, packing
        for name, (dtype, shape) in self.expected().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))

    @classmethod
    def config_for(cls, head: WeightOnlyLinear) -> dict[str, Any]:
        return {"num_embeddings": head.out_features, "embedding_dim": head.in_features, "bits": head.bits,
                "group_size": head.group_size, "packing": head.packing}

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        groups = (self.num_embeddings, self.embedding_dim // self.group_size)
        return {"codes": (torch.uint8, (self.num_embeddings, self.embedding_dim * self.bits // 8)),
                "scale": (torch.float32, groups), "zero": (torch.uint8, groups)}

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        rows = dequantize(self.codes.index_select(0, flat), self.scale.index_select(0, flat),
                          self.zero.index_select(0, flat), self.bits, self.group_size, self.packing)
        return self.rows_in_dtype(rows).reshape(*indices.shape, self.embedding_dim)

    def config(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size, "packing": self.packing, **self.dtype_config()}

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, "
                f"rows of the tied head's packed weight")


def expect_tensor(module: nn.Module, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """FormatError (naming the module's `_where` and the tensor) unless it is a contiguous `dtype` `shape`."""
    tensor = module._buffers.get(name)
    if tensor is None or tensor.dtype != dtype or tensor.device.type == "meta" or tuple(tensor.shape) != shape \
            or not tensor.is_contiguous():
        got = "nothing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)} on {tensor.device}"
        raise FormatError(f"{module._where}: tensor {name!r} is {got}, expected contiguous {dtype} {list(shape)}")


def _check_config(in_features: int, out_features: int, bits: int, group_size: int, kernel: str,
                  packing: str, owner: str = "WeightOnlyLinear") -> None:
    """A configuration read from a file is checked before anything is built from it."""
    sizes = (in_features, out_features, group_size)
    if (not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes) or bits not in (4, 8)
            or in_features % group_size or (bits == 4 and in_features % 2) or kernel not in KERNELS
            or packing not in PACKINGS or (packing == "blocks" and in_features % C_BLOCK)):
        raise ConfigError(f"{owner}: needs positive in_features / out_features / group_size with "
                          f"group_size dividing in_features (even for bits=4), bits 4 or 8, kernel one of "
                          f"{sorted(KERNELS)}, packing one of {sorted(PACKINGS)} ('blocks' needs in_features a "
                          f"multiple of {C_BLOCK}); got in_features={in_features!r}, out_features={out_features!r}, "
                          f"bits={bits!r}, group_size={group_size!r}, kernel={kernel!r}, packing={packing!r}")


# ---- the kernels -----------------------------------------------------------------------------------

def _with_bias(module: WeightOnlyLinear, out: torch.Tensor) -> torch.Tensor:
    return out if module.bias is None else out.add_(module.bias)


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """csrc/wo_gemv.c built for this machine with its argument types set once, or None where it cannot be."""
    lib = library("wo_gemv")
    if lib is not None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        for fn in (lib.wo_int4, lib.wo_int8):
            fn.restype = ctypes.c_int  # 0, or -1 where its scratch could not be allocated
            fn.argtypes = [pointer, size, size, size, pointer, pointer, pointer, size, pointer, pointer]
    return lib


def _c_refusal(module: WeightOnlyLinear) -> str | None:
    if module.group_size % C_BLOCK:
        return f"group_size {module.group_size} is not a multiple of {C_BLOCK}"
    if module.bits == 4 and module.packing != "blocks":
        return "4-bit codes packed in pairs (an older file): the C kernel reads blocks of 32 columns"
    if module.codes.device.type != "cpu":
        return f"the codes are on {module.codes.device}, the C kernel runs on the CPU"
    if c_library() is None:
        return "no C compiler here to build it (or FXCOMPRESS_NO_C=1)"
    return None


def gemv_eager(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """x float32 [rows, in] (contiguous, CPU) times the weight the codes hold, plus bias, by csrc/wo_gemv.c."""
    fn = c_library().wo_int4 if bits == 4 else c_library().wo_int8
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    if fn(x.data_ptr(), x.shape[0], x.shape[1], out_features, codes.data_ptr(), scale.data_ptr(), zero.data_ptr(),
          group_size, None if bias is None else bias.data_ptr(), y.data_ptr()):
        raise MemoryError(f"wo_gemv could not allocate {x.shape[0]} x {x.shape[1] // group_size} floats of scratch")
    return y


# The same product as an opaque custom op, for graphs that torch.compile / torch.export trace; plain
# eager inference calls ctypes directly (the op's dispatch costs microseconds on calls that take tens)
weight_only_gemv = torch.library.custom_op("fxcompress::weight_only_gemv", gemv_eager, mutates_args=())


@weight_only_gemv.register_fake
def _(x, codes, scale, zero, bias, bits, group_size, out_features):
    return x.new_empty((x.shape[0], out_features))


def _c_gemv(module: WeightOnlyLinear) -> Rows:
    tensors = (module.codes, module.scale, module.zero, module.bias)
    sizes = (module.bits, module.group_size, module.out_features)
    fn = c_library().wo_int4 if module.bits == 4 else c_library().wo_int8
    # the buffers' addresses, taken once: the closure keeps the buffers alive, and moving or reloading
    # them (_apply, check_loaded) rebuilds the closure
    shape = (module.in_features, module.out_features)
    static = (*(t.data_ptr() for t in tensors[:3]), module.group_size,
              None if module.bias is None else module.bias.data_ptr())

    def run(x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():  # traced: fake or proxy tensors
            return torch.ops.fxcompress.weight_only_gemv(x, *tensors, *sizes)
        y = torch.empty(x.shape[0], shape[1], dtype=torch.float32)  # x: float32, contiguous, CPU (forward's)
        if fn(x.data_ptr(), x.shape[0], *shape, *static, y.data_ptr()):
            raise MemoryError(f"{module._where}: the C kernel could not allocate {x.shape[0]} x "
                              f"{shape[0] // module.group_size} floats of scratch")
        return y
    return run


def _int8pack_refusal(module: WeightOnlyLinear) -> str | None:
    if module.group_size != module.in_features:
        return "one scale per output channel only (the grid has groups)"
    centered = module.centered()
    if float(centered.min()) < -128 or float(centered.max()) > 127:
        return "codes minus zero-point do not fit int8 (an asymmetric 8-bit grid)"
    return None


def _int8pack(module: WeightOnlyLinear) -> Rows:
    weight = module.centered().to(torch.int8)
    scale = module.scale[:, 0].contiguous()
    # torch's kernel wants the last dimension's stride to be 1, which "contiguous" rows of one feature
    # (a Linear(1, n) on a permuted input) need not have: torch ignores strides of size-1 dimensions
    return lambda x: _with_bias(module, torch._weight_int8pack_mm(
        x if x.stride(-1) == 1 else x.clone(memory_format=torch.contiguous_format), weight, scale))


def _int4_group(module: WeightOnlyLinear) -> int | None:
    return next((g for g in INT4_GROUPS if module.group_size % g == 0), None)


def _int4pack_refusal(module: WeightOnlyLinear) -> str | None:
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no _weight_int4pack_mm_for_cpu"
    if module.bits != 4:
        return "the grid has more than 16 levels"
    if _int4_group(module) is None:
        return f"group_size {module.group_size} is not a multiple of any of {INT4_GROUPS}"
    if module.out_features % INT4_N_MULTIPLE:
        return f"out_features {module.out_features} is not a multiple of {INT4_N_MULTIPLE}"
    return None


def _int4pack(module: WeightOnlyLinear) -> Rows:
    group = _int4_group(module)
    repeat = module.group_size // group
    packed = torch._convert_weight_to_int4pack_for_cpu(module.unsigned_codes().to(torch.int32), 1)
    scale = module.scale.repeat_interleave(repeat, dim=1)
    zero = (8 - module.zero.float().repeat_interleave(repeat, dim=1)) * scale  # tinygemm: (u - 8) * s + zero
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return lambda x: _with_bias(module, torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros))


def _fbgemm_refusal(module: WeightOnlyLinear) -> str | None:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm"
    if float(module.centered().abs().max()) > FP16_EXACT:
        return "centered codes are not exact in fp16"
    return None


def _fbgemm_fp16(module: WeightOnlyLinear) -> Rows:
    packed = torch.ops.quantized.linear_prepack_fp16(module.centered(), None)
    groups = module.in_features // module.group_size
    scale_t = module.scale.t().contiguous()  # [groups, out]
    if groups == 1:
        return lambda x: _with_bias(module, torch.ops.quantized.linear_dynamic_fp16(x, packed).mul_(scale_t[0]))
    # block-diagonal input: row (m, g) holds x[m] on group g's columns only, so output row (m, g) is
    # the dot product of x with group g of every output channel; scale each group and sum
    select = torch.block_diag(*[torch.ones(1, module.group_size)] * groups)  # [groups, in]

    def run(x: torch.Tensor) -> torch.Tensor:
        blocks = (x.unsqueeze(1) * select).reshape(-1, module.in_features)
        # sizes spelled out: -1 is ambiguous for an empty batch
        partial = torch.ops.quantized.linear_dynamic_fp16(blocks, packed).reshape(x.shape[0], groups,
                                                                                  module.out_features)
        return _with_bias(module, (partial * scale_t).sum(dim=1))
    return run


KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (
    FLOAT,
    Kernel("c_gemv", _c_refusal, _c_gemv),
    Kernel("int8pack", _int8pack_refusal, _int8pack),
    Kernel("int4pack", _int4pack_refusal, _int4pack),
    Kernel("fbgemm_fp16", _fbgemm_refusal, _fbgemm_fp16),
)}
WeightOnlyLinear.KERNELS = KERNELS  # the table names the kernel functions, which are defined after the class
QUANTIZED_KERNELS = tuple(name for name in KERNELS if name != "float")


def refusals(module: WeightOnlyLinear, kernels: Sequence[str] = QUANTIZED_KERNELS) -> dict[str, str]:
    """Why each of `kernels` cannot run this layer (kernels that can are absent)."""
    return module.refusals(kernels)


def choose(module: WeightOnlyLinear, x: torch.Tensor, kernels: Sequence[str] = QUANTIZED_KERNELS, *,
           repeats: int = 7, margin: float = 1.05, cold: bool = False) -> KernelChoice:
    """Time the float layer, the float kernel and every kernel of `kernels` that fits on input `x`, and
    set the fastest (the float kernel unless a kernel beats it by `margin`) as the module's kernel."""
    return module.choose(x, kernels, repeats=repeats, margin=margin, cold=cold)


# ---- weights whose values lie on a uniform grid (k-means codebooks) ------------------------------

def fit_grid(rows: torch.Tensor, per_row: bool, max_levels: int = 256) -> GroupedCodes | str:
    """`rows` [out, in] as codes on one uniform grid (per row, or one for the whole tensor) that
    reproduces every value bit for bit; otherwise the reason, naming the first row that does not fit.

    A k-means codebook fits when its centroids are integer multiples of one step (plus an offset), e.g.
    after snapping them to a grid; trained centroids almost never do, and are refused rather than rounded.
    """
    rows = rows.detach().float()
    groups = rows if per_row else rows.reshape(1, -1)
    codes, scales, zeros = [], [], []
    for index, group in enumerate(groups):
        found = _grid_of(torch.unique(group), max_levels)
        if isinstance(found, str):
            return f"{'row ' + str(index) if per_row else 'the weight'}: {found}"
        step, low, values = found
        codes.append(torch.round(group / step).to(torch.int32) - low)
        scales.append(float(step))
        zeros.append(-low)
    scale = torch.tensor(scales, dtype=torch.float32).reshape(-1, 1).expand(rows.shape[0], 1).contiguous()
    zero = torch.tensor(zeros, dtype=torch.float32).reshape(-1, 1).expand(rows.shape[0], 1).contiguous()
    q = torch.stack(codes).reshape(rows.shape)
    levels = int(q.max()) + 1
    grouped = GroupedCodes(q, scale, zero, rows.shape[1], 0, 15 if levels <= 16 else 255)
    if not torch.equal(grouped.dequantize(), rows):  # the grid must give back every value exactly
        return "the values are not reproduced exactly by (code - zero) * step in float32"
    return grouped


def _grid_of(values: torch.Tensor, max_levels: int) -> tuple[torch.Tensor, int, int] | str:
    """(step, lowest n, levels): every value is n * step exactly for integers n, which with 0 span `levels`;
    or why not."""
    if values.numel() == 1:
        step = values.abs().clamp(min=torch.finfo(torch.float32).tiny)[0]
        n = int(torch.round(values[0] / step))
        return step, min(n, 0), abs(n) + 1
    smallest = (values[1:] - values[:-1]).min()
    for divisor in range(1, max_levels):  # the step divides the smallest gap between two values
        n = torch.round(values / (smallest / divisor))
        low, high = min(int(n.min()), 0), max(int(n.max()), 0)  # the grid spans 0 too: the zero-point is a code
        if high - low >= max_levels:
            break
        step = _exact_step(values, n)
        if step is not None:
            return step, low, high - low + 1
    return (f"its {values.numel()} distinct values are not integer multiples of one step "
            f"(smallest gap {float(smallest):.6g}) within {max_levels} levels")


def _exact_step(values: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
    """A float32 step with n * step == values bit for bit, if one of the candidates is (each value over
    its integer, largest integers first, and their neighbouring floats: the gap was rounded)."""
    order = torch.argsort(n.abs(), descending=True)[:4]
    for i in order[n[order] != 0]:
        base = values[i] / n[i]
        for step in (base, torch.nextafter(base, base + 1), torch.nextafter(base, base - 1)):
            if torch.equal(n * step, values):
                return step
    return None
