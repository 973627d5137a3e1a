"""Exact lowest-n selection across many score tensors, holding one tensor's scores at a time.

Global magnitude pruning ranks every group of every layer at once. Concatenating all scores and
asking torch.topk for the lowest n costs several times the model's size (the scores, their
concatenation, topk's values and int64 indices). Here the scores are instead visited layer by layer,
three times, keeping only two 65,536-bin histograms:

1. each float32 score is mapped to an int32 *order key* (its bit pattern, negatives flipped, so keys
   order exactly as the floats do; -0.0 counts as +0.0) and the keys' high 16 bits are counted;
   the bin holding the n-th lowest key is found from the running counts;
2. the low 16 bits of the keys in that one bin are counted, which pins down the n-th lowest key
   exactly, and how many keys lie below it;
3. each layer prunes every score whose key is below the threshold key, and as many of the scores
   equal to it as are still owed, earliest first (layer order, then flat index).

Up to 65,536 scores in all (a small layer, a small model), the keys are kept and the n-th lowest
is found by torch.kthvalue: the same threshold key and the same count below it, without the
histograms' fixed cost.

The groups pruned are exactly the first n of a stable sort of all scores (`torch.sort(...,
stable=True)`), tested so; torch.topk breaks ties at the threshold in an unspecified order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..memory import release_freed_memory
from ..errors import ConfigError, PreconditionError

_BINS = 1 << 16
_HALF = 1 << 15
_LOW = _BINS - 1
_INF = 0x7F800000  # the bit pattern of +inf; larger magnitudes are NaN
_CHUNK = 1 << 20  # scores turned into keys at a time: the keys' buffers stay a few MB whatever the layer
# up to this many scores in all, their keys are kept and ranked at once: 256 KB of keys, and with
# kthvalue's working copy and int64 indices about the 1 MB the two 65,536-bin histograms take themselves;
# one kthvalue instead of two counts and their running sums (about 9 ms a call, however small the layer)
_SMALL = 1 << 16


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys that order as the float32 `scores` do, -0.0 and +0.0 alike (NaN: beyond +-inf).

    A float's bits without the sign are its magnitude in order, so the key is that magnitude,
    negated for negative floats: -0.0 becomes 0 as +0.0 does.
    """
    bits = scores.detach().reshape(-1).float().view(torch.int32)
    sign = bits >> 31  # -1 for negative floats, 0 otherwise
    keys = bits & 0x7FFFFFFF
    keys ^= sign
    keys -= sign  # (m ^ -1) + 1 == -m
    return keys


def _keys(name: str, scores: torch.Tensor, check: bool = False):
    """The order keys of `scores`, a chunk at a time; with `check`, NaN scores raise naming the layer."""
    flat = scores.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        keys = order_keys(flat[start:start + _CHUNK])
        if check and bool((keys.abs() > _INF).any()):
            bad = int(torch.isnan(scores).sum())
            raise PreconditionError(f"{name or 'a layer'} has {bad} NaN importance scores; they have no place in "
                                    "a ranking (NaN or Inf weights, or an importance that divides by zero)")
        yield keys


def _count_high(high: torch.Tensor, keys: torch.Tensor) -> None:
    """Add the high 16 bits of `keys` (overwritten) to the counts `high`."""
    keys >>= 16
    keys += _HALF
    high += torch.bincount(keys, minlength=_BINS)


def _first_reaching(counts: torch.Tensor, start: int, n: int) -> tuple[int, int]:
    """The first bin at which `start` plus the running count reaches n, and the count before that bin."""
    running = torch.cumsum(counts, 0) + start
    index = int(torch.searchsorted(running, torch.tensor([n], dtype=running.dtype)).item())
    return index, int(running[index - 1]) if index > 0 else start


class LowestN:
    """The lowest `n` of a sequence of score tensors, as a threshold key plus a count of ties owed.

    Build it with `LowestN.find(batches, n)`, where `batches()` yields the (name, scores) of each
    layer in a fixed order (called twice); then call `keep(scores)` once per layer, in the same
    order, for a bool tensor shaped like the scores: False for the pruned groups.
    """

    def __init__(self, key: int | None, ties: int) -> None:
        self.key, self.ties_left = key, ties

    @classmethod
    def find(cls, batches: Callable[[], Iterable[tuple[str, torch.Tensor]]], n: int) -> LowestN:
        if n <= 0:
            return cls(None, 0)
        few, high, total = [], None, 0
        for name, scores in batches():
            for keys in _keys(name, scores, check=True):
                total += keys.numel()
                if high is None and total <= _SMALL:
                    few.append(keys)  # a few scores in all: their keys are kept and ranked directly
                    continue
                if high is None:  # too many to keep: count them, those kept so far first
                    high = torch.zeros(_BINS, dtype=torch.int64)
                    for kept in few:
                        _count_high(high, kept)
                    few = []
                _count_high(high, keys)
            scores = keys = None  # the layer's scores and keys go before the trim, not when the next layer's arrive
            if high is not None:
                release_freed_memory()  # glibc keeps a layer's freed scores and keys resident; hand them back
        if n > total:
            raise PreconditionError(f"cannot prune {n} of {total} groups")
        return cls._ranked(torch.cat(few), n) if high is None else cls._streamed(batches, high, n)

    @staticmethod
    def streams(total: int) -> bool:
        """Whether `find` visits `total` scores twice (the histograms) rather than ranking them at once."""
        return total > _SMALL

    @classmethod
    def _ranked(cls, keys: torch.Tensor, n: int) -> LowestN:
        """The n-th lowest key and how many keys lie below it, as the histograms would pin them down:
        the same threshold and ties owed, without two 65,536-bin counts and their running sums."""
        key = int(torch.kthvalue(keys, n).values)
        return cls(key, n - int((keys < key).sum()))

    @classmethod
    def _streamed(cls, batches: Callable[[], Iterable[tuple[str, torch.Tensor]]], high: torch.Tensor,
                  n: int) -> LowestN:
        """Steps 2 and 3 of the module's histogram walk, from the high bits' counts of step 1."""
        top, below_top = _first_reaching(high, 0, n)
        low = torch.zeros(_BINS, dtype=torch.int64)
        for name, scores in batches():
            for keys in _keys(name, scores):
                low += torch.bincount(keys[(keys >> 16) == top - _HALF] & _LOW, minlength=_BINS)
            scores = keys = None
            release_freed_memory()
        bottom, below = _first_reaching(low, below_top, n)
        return cls(((top - _HALF) << 16) | bottom, n - below)

    def keep(self, scores: torch.Tensor, name: str = "", out: torch.Tensor | None = None) -> torch.Tensor:
        """False where this layer's groups are among the lowest n (ties at the threshold: earliest first).
        `out`: a bool tensor shaped like the scores to write into (a mask allocated before the scores)."""
        if out is None:
            keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        elif out.dtype != torch.bool or out.shape != scores.shape or not out.is_contiguous():
            raise ConfigError(f"LowestN.keep: layer {name!r}: out must be a contiguous bool tensor of the scores' "
                              f"shape {tuple(scores.shape)}, got {out.dtype} {tuple(out.shape)}")
        else:
            keep = out.view(-1).fill_(True)
        if self.key is None:
            return keep.view(scores.shape)
        for start, keys in zip(range(0, scores.numel(), _CHUNK), _keys(name, scores)):
            part = keep[start:start + _CHUNK]
            torch.gt(keys, self.key, out=part)
            tied = torch.nonzero(keys == self.key).flatten()
            part[tied[self.ties_left:]] = True  # ties owed go first; the later ones stay
            self.ties_left -= min(self.ties_left, tied.numel())
        return keep.view(scores.shape)
