"""The blockwise second-order sweep shared by SparseGPT and GPTQ (Frantar & Alistarh 2022, 2023).

Columns (input channels) are fixed one at a time, left to right; the error each fixed column
makes is spread onto the columns not yet fixed through the inverse Hessian's Cholesky factor, so
the layer's output on the calibration inputs changes as little as possible. Work is done in
blocks of `blocksize` columns: inside a block column by column, then one matrix product carries
the block's errors to everything right of it (the "lazy batch" update).

What fixing a column means is the caller's: `prune` chooses the zeros (or a fixed mask gives
them), `round` puts the kept values on a grid or a codebook (or leaves them as they are).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layers import KINDS

BLOCKSIZE = 128

# (current values of some columns, their inverse-Hessian diagonal) -> pruned positions among them (bool)
Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (column index, values) -> the values the column is fixed to
Rounder = Callable[[int, torch.Tensor], torch.Tensor]


def as_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever way the layer kind stores it."""
    spec = KINDS[kind]
    return weight.movedim(spec.out_dim, 0).reshape(weight.shape[spec.out_dim], -1) if spec.out_dim else weight


def from_matrix(matrix: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of `as_matrix` for the linear family (a 2-D weight)."""
    return matrix.T if KINDS[kind].out_dim else matrix


@dataclass
class SweepResult:
    weight: torch.Tensor   # (out, in) float64: the fixed values
    pruned: torch.Tensor   # (out, in) bool


def sweep(weight: torch.Tensor, factor: torch.Tensor, *, pruned: torch.Tensor | None = None,
          select: Selector | None = None, select_every: int = BLOCKSIZE, round_: Rounder | None = None,
          prepare: Callable[[int, torch.Tensor], None] | None = None, prepare_every: int = BLOCKSIZE,
          blocksize: int = BLOCKSIZE) -> SweepResult:
    """One pass over the columns of `weight` (out, in) with the upper Cholesky factor of H^-1.

    `pruned` (bool, weight-shaped) are positions that must end exactly zero; `select` may add
    more, called on every `select_every` columns (a divisor of `blocksize`) with their values as
    the earlier columns' errors left them (SparseGPT's adaptive OBS choice); `round_` fixes each
    column's kept values; `prepare` sees every `prepare_every` columns (a divisor of `blocksize`) as
    the earlier columns' errors left them before any is fixed (GPTQ's grid of a group, found there).
    """
    w = weight.to(torch.float64).clone()
    cols = w.shape[1]
    forced = torch.zeros_like(w, dtype=torch.bool) if pruned is None else pruned.clone()
    out = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, h1 = w[:, i1:i2].clone(), factor[i1:i2, i1:i2]
        errors = torch.zeros_like(w1)
        diagonal = torch.diag(h1).tolist()
        zeros = select is not None or bool(forced[:, i1:i2].any())  # no masked_fill where nothing is pruned
        for i in range(i2 - i1):
            if prepare is not None and i % prepare_every == 0:
                prepare(i1 + i, w1[:, i:i + prepare_every])
            if select is not None and i % select_every == 0:
                j = min(i + select_every, i2 - i1)
                forced[:, i1 + i:i1 + j] |= select(w1[:, i:j], torch.diag(h1)[i:j])
            column = w1[:, i]
            fixed = column.masked_fill(forced[:, i1 + i], 0.0) if zeros else column
            if round_ is not None:
                fixed = round_(i1 + i, fixed)
                fixed = fixed.masked_fill(forced[:, i1 + i], 0.0) if zeros else fixed
            out[:, i1 + i] = fixed
            error = (column - fixed).div_(diagonal[i])
            w1[:, i:].addr_(error, h1[i, i:], alpha=-1)  # the rank-one update in place, no (out, block) temporary
            errors[:, i] = error
        w[:, i2:] -= errors @ factor[i1:i2, i2:]
    return SweepResult(out, forced)


def obs_select(sparsity: float) -> Selector:
    """SparseGPT's adaptive mask: in each block, prune the weights of smallest w^2 / [H^-1]_jj^2
    (the OBS saliency), `sparsity` of the block's weights (one threshold over the block)."""
    def select(w1: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        saliency = w1.pow(2) / diag.pow(2).unsqueeze(0)
        count = round(sparsity * saliency.numel())
        chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
        if count:
            chosen[torch.topk(saliency.flatten(), count, largest=False).indices] = True
        return chosen.view(saliency.shape)
    return select


def obs_select_nm(n: int, m: int) -> Selector:
    """SparseGPT's N:M mask: in each group of M consecutive columns, prune the M - N weights of
    smallest OBS saliency per row (call it every M columns: chosen from the values the earlier
    columns' errors left)."""
    def select(w1: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        saliency = w1.pow(2) / diag.pow(2).unsqueeze(0)
        rows, width = saliency.shape
        groups = saliency.reshape(rows, width // m, m)
        chosen = torch.zeros_like(groups, dtype=torch.bool)
        chosen.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
        return chosen.reshape(rows, width)
    return select


def output_error(weight: torch.Tensor, changed: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T): the squared output error per calibration token (H = mean X^T X)."""
    delta = (weight.to(torch.float64) - changed.to(torch.float64))
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())
