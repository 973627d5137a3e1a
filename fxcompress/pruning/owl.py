"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity").

Layers whose Wanda scores |W| * ||X|| hold more outliers (scores above `threshold` times the
layer's mean) matter more to a language model's output, so they are pruned less: each layer's
sparsity is the target plus or minus at most `spread`, falling linearly with its outlier ratio,
then shifted so that the sparsity over all the layers' weights is exactly the target.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import Interval, validate

_ROUNDS = 50  # shifts after clipping to [0, 1]: each moves the weighted mean closer to the target


@dataclass(frozen=True, kw_only=True)
class OWL:
    """The OWL profile of InsertMasks(importance="wanda", profile=OWL(...)).

    threshold  M: a weight is an outlier when its score exceeds M times its layer's mean score (paper: 5)
    spread     lambda: layer sparsities span at most 2 * spread (paper: 0.08): target +- spread before the shift
               that makes the mean over all weights the target, so layers of unequal sizes may end farther
               from the target than spread
    """

    threshold: float = 5.0
    spread: float = 0.08

    constraints: ClassVar[dict] = {"threshold": (Interval(float, 1.0, None, lo_open=True),),
                                   "spread": (Interval(float, 0.0, 0.5),)}

    def __post_init__(self) -> None:
        validate(self)


def outlier_ratio(scores: torch.Tensor, threshold: float) -> float:
    """The fraction of scores above `threshold` times their mean (pruned weights, -inf, left out)."""
    alive = scores[torch.isfinite(scores)]
    if alive.numel() == 0:
        return 0.0
    return float((alive > threshold * alive.mean()).float().mean())


def owl_sparsities(ratios: Mapping[str, float], sizes: Mapping[str, int], target: float,
                   spread: float) -> dict[str, float]:
    """Per-layer sparsities: more outliers, less pruning; the weight-count-weighted mean is `target`."""
    names = list(ratios)
    r = torch.tensor([ratios[n] for n in names], dtype=torch.float64)
    size = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    span = float(r.max() - r.min()) if len(names) else 0.0
    if span == 0.0:
        return {n: target for n in names}
    sparsity = target + spread - 2 * spread * (r - r.min()) / span
    for _ in range(_ROUNDS):  # the shift that fixes the mean can push a layer out of [0, 1]: clip and shift again
        sparsity = (sparsity + target - float((sparsity * size).sum() / size.sum())).clamp(0.0, 1.0)
    return {n: float(s) for n, s in zip(names, sparsity)}
