"""Observers: running statistics of an activation that give the range its fake-quant grid covers.

Each observer is an nn.Module whose state lives in buffers (so it saves with the model) and whose
constructor kwargs come back from `config()`; `update(x)` folds a batch in, `range()` returns
(low, high) as floats, or None before anything was observed.

* MinMaxObserver: the extremes of everything seen;
* MovingAverageMinMaxObserver: an exponential moving average of per-batch extremes (QAT);
* PercentileObserver: a histogram of everything seen, cut at a percentile on each side, so rare
  outliers do not stretch the grid.

Under torch.distributed (initialised, world size > 1) every update reduces the batch's statistics
across ranks before folding them in (extremes with MAX, histogram counts with SUM), so each rank
holds the state one process would reach on the concatenation of the ranks' batches: identical
grids everywhere, as calibration over the union of the data. Every rank must therefore feed its
observers the same number of batches (calibrate on every rank, each on its own shard).

Padding: while `calibrate` runs a batch whose attention mask marks padded positions, it sets each
observer's `keep` to the batch's kept (batch, sequence) positions, and `update` observes only the
activation's values there (a pad token's activations are no text the model reads, and an outlier
there would stretch the grid every real token is rounded on). An activation not laid out as
(batch, sequence, ...) or (batch * sequence, ...) is observed whole, and `padding_included` says so.
A subclass's `update` should read `self.tokens(x)` rather than `x` to follow this.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..batches import token_rows
from ..config import check_int, check_real
from ..errors import PreconditionError

OBSERVERS = ("minmax", "moving_average", "percentile")


def distributed() -> bool:
    """Whether statistics are shared: torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """`tensor` reduced in place across all ranks by `op` ("MAX", "SUM", ...) when running distributed.

    Without a process group it is returned unchanged (the op is looked up only when needed: builds
    without torch.distributed lack dist.ReduceOp).
    """
    if distributed():
        dist.all_reduce(tensor, getattr(dist.ReduceOp, op))
    return tensor


def kept_values(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """`x`'s values at the positions `keep` (batch, sequence) marks, or None where `x` does not line up with
    them. An observer reads values, not channels, so any layout that starts (batch, sequence) qualifies
    (a (batch, sequence) value, heads split off (batch, sequence, heads, dim)); the calibration walk's
    `token_rows` decides the rest, a (batch * sequence, channels) value included."""
    if x.ndim >= 2 and tuple(x.shape[:2]) == tuple(keep.shape) and x.numel():
        x = x.reshape(*keep.shape, -1)
    return token_rows(x, keep)


class Observer(nn.Module):
    """Base class: buffers `low` / `high` hold the observed range once `seen` is set.

    `keep` and `padding_included` are plain attributes, not state: `calibrate` sets them around each batch
    (class defaults, so an observer saved whole before they existed still loads and observes everything).
    """

    keep: torch.Tensor | None = None      # the batch's kept (batch, sequence) positions; None: observe all
    padding_included: bool = False        # a batch with padding was observed whole (its layout did not line up)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))

    def update(self, x: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def range(self) -> tuple[float, float] | None:
        return (float(self.low), float(self.high)) if bool(self.seen) else None

    def config(self) -> dict[str, Any]:
        return {}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """What `update` observes of `x`: its values at the kept positions while `keep` is set (flattened),
        else `x` itself; an `x` that does not line up with them is observed whole and flagged."""
        if self.keep is None:
            return x
        kept = kept_values(x, self.keep)
        if kept is None:
            self.padding_included = True
            return x
        return kept

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's extremes, over every rank's batch when distributed (one MAX reduction of -low, high);
        None when no rank observed any value (every position of the batch was padding): nothing to fold in.

        A batch holding NaN or Inf is refused with PreconditionError before any state changes: its
        range would give the grid an infinite or NaN scale, turning every later input to NaN. The
        error carries the refusing observer as `.observer`, so `calibrate` can name its quantizer.
        """
        if x.numel():
            low, high = x.detach().float().aminmax()
        else:  # no value (padding only): the MAX identity, so that this rank still takes part in the reduction
            low, high = (torch.full((), value, device=x.device) for value in (torch.inf, -torch.inf))
        extremes = torch.stack([-low, high])
        # NaN enters the reduction as +inf: MAX is unordered on NaN, and every rank must refuse together
        extremes = all_reduce(torch.where(extremes.isnan(), torch.inf, extremes), "MAX")
        # +inf is the only non-finite a batch of values can give here (low <= high: a -inf end means an Inf
        # value, whose negation or itself is +inf); -inf at both ends is the empty identity, not a value
        if bool((extremes == torch.inf).any()):  # the only check: two values already computed
            error = PreconditionError(
                f"activation observer: the batch's activation holds NaN or Inf (range [{float(low)}, {float(high)}] "
                "here); a grid over it would turn every input to NaN, so the batch is refused and this observer "
                "keeps its state: clean the data (in training, check for diverged weights too, or "
                "freeze_observers(gm))")
            error.observer = self
            raise error
        if bool(extremes[1] == -torch.inf):
            return None
        return -extremes[0], extremes[1]


class MinMaxObserver(Observer):
    """The smallest and largest value seen."""

    def update(self, x: torch.Tensor) -> None:
        extremes = self._batch_range(self.tokens(x))
        if extremes is None:
            return
        low, high = extremes
        if bool(self.seen):
            low, high = torch.minimum(low, self.low), torch.maximum(high, self.high)
        self.low.copy_(low)
        self.high.copy_(high)
        self.seen.fill_(True)


class MovingAverageMinMaxObserver(Observer):
    """low/high move towards each batch's extremes by `momentum` (the first batch sets them)."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        check_real("MovingAverageMinMaxObserver", "momentum", momentum, 0.0, 1.0, lo_open=True)
        self.momentum = float(momentum)

    def update(self, x: torch.Tensor) -> None:
        extremes = self._batch_range(self.tokens(x))
        if extremes is None:  # no token in the batch: it must not pull the average
            return
        low, high = extremes
        if bool(self.seen):
            low = torch.lerp(self.low, low, self.momentum)
            high = torch.lerp(self.high, high, self.momentum)
        self.low.copy_(low)
        self.high.copy_(high)
        self.seen.fill_(True)

    def config(self) -> dict[str, Any]:
        return {"momentum": self.momentum}


class PercentileObserver(Observer):
    """A histogram over a symmetric range that doubles when a value falls outside it.

    `range()` cuts `100 - percentile` percent of the mass off each tail (at bin resolution).
    Doubling merges neighbouring bins pairwise, so the counts stay exact and no data is kept.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__()
        check_real("PercentileObserver", "percentile", percentile, 50.0, 100.0)
        check_int("PercentileObserver", "bins", bins, 2)
        bins = -(-bins // 4) * 4  # doubling merges bins in pairs into the middle half: a multiple of 4
        self.percentile = float(percentile)
        self.bins = int(bins)
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("limit", torch.tensor(0.0))  # the histogram covers [-limit, limit]

    def update(self, x: torch.Tensor) -> None:
        values = self.tokens(x).detach().float().reshape(-1)
        extremes = self._batch_range(values)  # every rank's extremes: all ranks grow the same limit
        if extremes is None:  # no rank observed a value: every rank skips the counts' reduction together
            return
        low, high = extremes
        extent = float(torch.maximum(low.abs(), high.abs()))
        if not bool(self.seen) or float(self.limit) == 0.0:
            self.limit.fill_(max(extent, 1e-8))
        while extent > float(self.limit):
            self._double()
        limit = float(self.limit)
        counts = torch.histc(values, self.bins, -limit, limit).double()
        self.histogram += all_reduce(counts, "SUM")  # integer counts: the sum is exact
        self.low.copy_(torch.minimum(low, self.low) if bool(self.seen) else low)
        self.high.copy_(torch.maximum(high, self.high) if bool(self.seen) else high)
        self.seen.fill_(True)

    def _double(self) -> None:
        """Cover [-2 limit, 2 limit] with the same number of bins: pairs of bins merge into the middle half."""
        merged = self.histogram.reshape(-1, 2).sum(dim=1)
        quarter = self.bins // 4
        wider = torch.zeros_like(self.histogram)
        wider[quarter: quarter + merged.numel()] = merged
        self.histogram.copy_(wider)
        self.limit.mul_(2.0)

    def range(self) -> tuple[float, float] | None:
        if not bool(self.seen):
            return None
        cdf = torch.cumsum(self.histogram, 0)
        total = float(cdf[-1])
        tail = total * (100.0 - self.percentile) / 100.0
        width = 2 * float(self.limit) / self.bins
        first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype), right=True))
        last = int(torch.searchsorted(cdf, torch.tensor(total - tail, dtype=cdf.dtype)))
        low = max(-float(self.limit) + first * width, float(self.low))
        high = min(-float(self.limit) + (last + 1) * width, float(self.high))
        return min(low, high), max(low, high)

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "bins": self.bins}


def make_observer(kind: str, **options: Any) -> Observer:
    """An observer by name: "minmax", "moving_average" (momentum=) or "percentile" (percentile=, bins=)."""
    classes = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
               "percentile": PercentileObserver}
    return classes[kind](**options)
