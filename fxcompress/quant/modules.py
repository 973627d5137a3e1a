"""The fake-quant modules InsertFakeQuant puts in the graph.

Weight modules sit on a weight chain (`weight -> [mask mul] -> fake-quant -> F.linear`) and
subclass `fxcompress.layers.WeightTransform`; the activation module sits on a layer's input. Each
rebuilds from `type(m)(**m.config())` plus `load_state_dict`, and can be switched off
(`enabled = False`) to run the float model on the same GraphModule.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_int
from ..errors import ConfigError, PreconditionError
from ..layers import WeightTransform
from .observers import make_observer
from .quantizers import (SCALE_DTYPES, Grid, GroupedCodes, as_rows, check_finite, fake_quantize, fixed_point_grid,
                         from_rows, grouped_codes, kmeans_codebook, linear_grid, quantize)


MAX_BITS = 16  # InsertFakeQuant's and ActivationConfig's range of bits (1..16)


def check_bits(owner: str, bits: Any, symmetric: bool = False) -> None:
    """ConfigError naming `owner.bits` unless it is an integer of 1..MAX_BITS (2.. for a symmetric grid, which needs
    room for -s, 0 and +s). A constructor checks it (a file's configuration reaches the constructor): a grid of
    bits=-8 or 10**6 failed at its first forward (a negative shift count, a grid of 2**10**6 levels)."""
    check_int(owner, "bits", bits, 2 if symmetric is True else 1, MAX_BITS)


def code_dtype(bits: int) -> torch.dtype:
    """The integer type of a k-means layer's codes at `bits` (codes run from 0 to 2^bits)."""
    return torch.uint8 if bits < 8 else torch.int16 if bits < 15 else torch.int32


# Positions gathered at a time by a forward without autograd (int32: 1 MiB).
_GATHER_BLOCK = 1 << 18


class KMeansWeight(WeightTransform):
    """Weight sharing: each weight is a trainable centroid picked by a fixed code.

    The forward is a gather of `codebook` by the `codes` buffer, so autograd gives every centroid
    the sum of its members' gradients (Deep Compression's centroid update) and the assignment
    never changes unless `recluster` is called. With `fixed_zero`, code 0 decodes to a constant 0
    that receives no gradient: pruned weights stay exactly zero.
    """

    def __init__(self, shape: list[int], bits: int, size: int, groups: int = 1, axis: int | None = None,
                 fixed_zero: bool = True, enabled: bool = True) -> None:
        super().__init__()
        check_bits("KMeansWeight", bits)
        self.bits, self.size, self.groups, self.axis, self.fixed_zero = bits, size, groups, axis, fixed_zero
        self.codebook = nn.Parameter(torch.zeros(groups, size))
        # the narrowest type the codes fit (0 .. size): a uint8 buffer is a quarter of the float weight
        # it stands for, an int32 one as large, and it lives as long as the fake-quant model
        self.register_buffer("codes", torch.zeros(tuple(shape), dtype=code_dtype(bits)))
        self.enabled = enabled

    @classmethod
    def fit(cls, weight: torch.Tensor, bits: int, init: str = "linear", *, fix_zeros: bool = True,
            axis: int | None = None, seed: int = 0) -> KMeansWeight:
        """Cluster `weight` (per tensor, or per output channel along `axis`) into <= 2^bits values."""
        book = kmeans_codebook(weight, bits, init, fix_zeros=fix_zeros, axis=axis, seed=seed)
        module = cls(list(weight.shape), bits, book.centroids.shape[1], book.centroids.shape[0], axis,
                     book.fixed_zero)
        if book.codes.dtype == module.codes.dtype and book.codes.is_contiguous():
            # the module keeps the codes the clustering wrote (allocated before its transients), not a
            # copy made after them: one block a layer, low in the heap, instead of two
            module.codes = book.codes
            with torch.no_grad():
                module.codebook.copy_(book.centroids)
        else:
            module.load_codebook(book.centroids, book.codes)
        return module

    def load_codebook(self, centroids: torch.Tensor, codes: torch.Tensor) -> None:
        with torch.no_grad():
            self.codebook.copy_(centroids)
            self.codes.copy_(codes)

    def table(self) -> torch.Tensor:
        """(groups, entries): the values codes decode to, the fixed 0 first when `fixed_zero`."""
        return F.pad(self.codebook, (1, 0)) if self.fixed_zero else self.codebook

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        # One index_select into the flat table: the backward is one index_add whose codebook part is
        # contiguous, laid out like the codebook (a padded 2-D table would give the codebook a strided
        # gradient, which DistributedDataParallel has to copy into its buckets, with a warning).
        flat = self.codebook.reshape(-1)
        table = torch.cat([flat.new_zeros(1), flat]) if self.fixed_zero else flat
        if torch.is_grad_enabled() and self.codebook.requires_grad:
            positions = self.positions()
            values = table.index_select(0, positions.reshape(-1)).reshape(positions.shape)
        else:
            values = self._gather(table)
        return from_rows(values, self.codes.shape, self.axis).to(weight.dtype)

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        """`table[positions()]` without autograd, a block of positions at a time into one output: the
        whole-layer int32 positions (as large as the float weight) are never held, only a block's."""
        codes = as_rows(self.codes, self.axis)
        out = torch.empty(codes.shape, dtype=table.dtype, device=table.device)
        flat = out.view(-1)
        for start in range(0, flat.numel(), _GATHER_BLOCK):
            end = start + _GATHER_BLOCK
            torch.index_select(table, 0, self.flat_positions(start, end, codes), out=flat[start:end])
        return out

    def decoded(self, start: int, stop: int) -> torch.Tensor:
        """Values start..stop of the decoded weight in `as_rows(weight, axis)` order, flat, without autograd."""
        with torch.no_grad():
            flat = self.codebook.detach().reshape(-1)
            table = torch.cat([flat.new_zeros(1), flat]) if self.fixed_zero else flat
            return table.index_select(0, self.flat_positions(start, stop))

    def flat_positions(self, start: int, stop: int, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Positions start..stop of `positions()` flattened, int32, made from those codes only."""
        codes = as_rows(self.codes, self.axis) if codes is None else codes
        stop = min(stop, codes.numel())
        part = codes.reshape(-1)[start:stop]
        positions = part.to(torch.int32, copy=True)
        if self.groups == 1:
            return positions
        rows = torch.arange(start, stop, device=codes.device, dtype=torch.int32) // max(codes.shape[1], 1)
        positions += rows * self.size
        return positions.masked_fill_(part == 0, 0) if self.fixed_zero else positions

    def positions(self) -> torch.Tensor:
        """(groups, values), int32: each weight's index in the codebook flattened row after row, after
        a fixed 0 if any. Code c of group g is codebook[g, c - 1] (c >= 1) with a fixed zero, codebook[g, c] without.

        One int32 array worked on in place: int64 copies (the codes widened, offset, then masked) cost
        24 bytes a weight on every forward, six times the float weight they decode to.
        """
        codes = as_rows(self.codes, self.axis)
        positions = codes.to(torch.int32, copy=True)
        if self.groups == 1:  # one group: the position is the code itself, a fixed zero's code 0 included
            return positions
        positions += torch.arange(self.groups, device=codes.device, dtype=torch.int32).unsqueeze(1) * self.size
        return positions.masked_fill_(codes == 0, 0) if self.fixed_zero else positions

    def recluster(self, weight: torch.Tensor, seed: int = 0) -> None:
        """Cluster `weight` (the chain's float input) again, starting from the current centroids.

        The codebook keeps its shape (and its Parameter, so optimizers keep working).
        """
        check_finite(weight, "recluster")
        if self.fixed_zero and not bool((weight == 0).any()):
            raise PreconditionError("recluster: this codebook keeps a fixed zero, but the weight has no zeros any "
                                    "more; insert the fake-quant again instead")
        start = self.codebook.detach().double().cpu().numpy()
        book = kmeans_codebook(weight, self.bits, start, fix_zeros=self.fixed_zero, axis=self.axis, seed=seed)
        self.load_codebook(book.centroids, book.codes)

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.codes.shape), "bits": self.bits, "size": self.size, "groups": self.groups,
                "axis": self.axis, "fixed_zero": self.fixed_zero, "enabled": self.enabled}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, codebook={tuple(self.codebook.shape)}, fixed_zero={self.fixed_zero}"


class GridWeight(WeightTransform):
    """Linear (affine) or fixed-point fake-quant of a weight, rounding with the straight-through estimator.

    The grid is a function of the current weight (its min-max range, or the chosen fixed-point
    format), recomputed each forward, so it follows the float weights while they train. With
    `group_size` (linear grids of 2-D weights), each run of that many input channels of an output
    channel has its own grid. `scale_dtype="float16"` rounds the scales to half precision.
    """

    scale_dtype: str = "float32"  # modules pickled before the option had none

    def __init__(self, bits: int, method: str = "linear", symmetric: bool = False, int_bits: int | None = None,
                 axis: int | None = None, enabled: bool = True, group_size: int | None = None,
                 scale_dtype: str = "float32") -> None:
        super().__init__()
        check_bits("GridWeight", bits, symmetric and method == "linear")
        if scale_dtype not in SCALE_DTYPES or (scale_dtype != "float32" and method != "linear"):  # a file's too
            raise ConfigError(f"GridWeight: scale_dtype={scale_dtype!r} needs method='linear' and one of "
                              f"{sorted(SCALE_DTYPES)}")
        if group_size is not None and (method != "linear" or axis is None):  # a file's configuration too
            raise ConfigError(f"GridWeight: group_size={group_size} needs method='linear' and an output-channel "
                              f"axis, got method={method!r}, axis={axis!r}")
        self.bits, self.method, self.symmetric, self.int_bits, self.axis = bits, method, symmetric, int_bits, axis
        self.enabled, self.group_size, self.scale_dtype = enabled, group_size, scale_dtype

    def grid(self, weight: torch.Tensor) -> Grid:
        if self.method == "fixed_point":
            return fixed_point_grid(weight, self.bits, self.int_bits, self.axis)
        return linear_grid(weight, self.bits, self.symmetric, self.axis, self.group_size, self.scale_dtype)

    def grid_count(self, shape: Sequence[int]) -> int:
        """How many grids (scales) `grid` makes for a weight of `shape`, without computing them: one per
        tensor, one per slice along `axis`, and with `group_size` one per group of the other dim's channels."""
        if self.axis is None:
            return 1
        return shape[self.axis] * (shape[1 - self.axis] // self.group_size if self.group_size else 1)

    def grouped(self, weight: torch.Tensor) -> GroupedCodes:
        """`weight` on its grid as codes, scales and zero-points per (output channel, group), for lowering."""
        return grouped_codes(weight, self.grid(weight), self.axis)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return fake_quantize(weight, self.grid(weight), self.axis).to(weight.dtype)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of `weight` on its grid."""
        return quantize(weight, self.grid(weight), self.axis)

    def config(self) -> dict[str, Any]:
        config = {"bits": self.bits, "method": self.method, "symmetric": self.symmetric, "int_bits": self.int_bits,
                  "axis": self.axis, "enabled": self.enabled}
        config |= {} if self.group_size is None else {"group_size": self.group_size}
        return config if self.scale_dtype == "float32" else config | {"scale_dtype": self.scale_dtype}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


class ActivationQuant(nn.Module):
    """Fake-quant of an activation on a min-max grid taken from an observer.

    The observer takes in batches while `calibrating`, and in training mode while `observing`
    (quantization-aware training); `observing = False` freezes the grid. Before anything was
    observed the activation passes through unchanged. Under torch.distributed each observed batch
    is a collective (the observer reduces its statistics across ranks): every rank runs it.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, observer: str = "minmax",
                 options: dict[str, Any] | None = None, enabled: bool = True, observing: bool = True) -> None:
        super().__init__()
        check_bits("ActivationQuant", bits, symmetric)
        self.bits, self.symmetric = bits, symmetric
        self.observer = make_observer(observer, **(options or {}))
        self.kind = observer
        self.enabled, self.observing, self.calibrating = enabled, observing, False

    def grid(self) -> Grid | None:
        observed = self.observer.range()
        if observed is None:
            return None
        return linear_grid(torch.tensor(observed), self.bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or (self.training and self.observing):
            self.observer.update(x)
        grid = self.grid() if self.enabled else None
        return x if grid is None else fake_quantize(x, grid).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "symmetric": self.symmetric, "observer": self.kind,
                "options": self.observer.config(), "enabled": self.enabled, "observing": self.observing}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, observer={self.kind}"
