"""Masks chosen with calibration data (Wanda, OWL) or under an N:M constraint, for InsertMasks.

Wanda walks the model block by block (`fxcompress.calibration.walk`): each layer's input norms
come from the calibration data passed through the layers before it, already pruned, and each
output row keeps its highest |W| * ||X|| weights. With `OWL(...)`, a first walk over the unpruned
model measures every layer's outlier ratio and sets the per-layer sparsities.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from ..batches import calibration_batches
from ..errors import ConfigError
from ..pruning.importance import CALIBRATED_IMPORTANCES, count_to_prune, element_scores, keep_highest
from ..pruning.masks import get_mask, set_mask, sparsity_of, stored_weight
from ..pruning.nm import nm_keep, nm_pattern, row_keep
from ..pruning.owl import OWL, outlier_ratio, owl_sparsities
from .hessian import InputStats
from .sequential import Group, walk


def needs_calibration(importance: Any, profile: OWL | None) -> bool:
    return (isinstance(importance, str) and importance in CALIBRATED_IMPORTANCES) or profile is not None


def check_mask_config(owner: str, *, importance: Any, granularity: str, scope: str, sparsity: Any,
                      profile: OWL | None, schedule: Any) -> None:
    """Refuse the combinations the calibrated and N:M selections do not read."""
    nm = nm_pattern(granularity)
    calibrated = needs_calibration(importance, profile)
    if scope == "global" and (nm or calibrated):
        raise ConfigError(f"{owner}.scope='global' ranks across layers; {granularity!r} / importance={importance!r} "
                          f"/ profile select within each layer: use scope='local'")
    if calibrated and granularity not in ("element",) and not nm:
        raise ConfigError(f"{owner}.granularity={granularity!r}: Wanda and OWL compare single weights in each "
                          f"output row; use 'element' or an 'N:M' pattern")
    if profile is not None and nm:
        raise ConfigError(f"{owner}.profile: an N:M pattern fixes every layer's sparsity at 1 - N/M; OWL's "
                          f"per-layer sparsities need granularity='element'")
    if calibrated and schedule is not None:
        raise ConfigError(f"{owner}.schedule: calibrated masks are chosen once from calibration data, "
                          f"not along a training schedule")
    implied = 1 - nm[0] / nm[1] if nm else None
    if nm and isinstance(sparsity, float) and sparsity != 0.5 and abs(sparsity - implied) > 1e-9:
        raise ConfigError(f"{owner}.sparsity={sparsity!r} does not apply to granularity {granularity!r}, "
                          f"which prunes {implied:g} of every group")


def keep_for(gm: GraphModule, target: Any, sparsity: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """The keep mask of one target (InsertMasks's Target: layer, granularity, importance)."""
    layer = target.layer
    return select_keep(stored_weight(gm, layer), get_mask(gm, layer), layer, target.granularity, target.importance,
                       sparsity, norms)


def select_keep(weight: torch.Tensor, mask: torch.Tensor | None, layer: Any, granularity: str, importance: Any,
                sparsity: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Element keep mask: N:M groups for an "N:M" granularity; else Wanda per output row (as the paper
    compares), magnitude over the whole layer. Weights `mask` pruned are never kept."""
    scores = element_scores(weight, mask, layer.kind, importance, norms)
    nm = nm_pattern(granularity)
    if nm is not None:
        keep = nm_keep(scores, nm[0], nm[1], layer.kind, layer.name)
    elif importance == "wanda":
        keep = row_keep(scores, sparsity, layer.kind)
    else:
        keep = keep_highest(scores, count_to_prune(sparsity, scores.numel()))
    return keep if mask is None else keep & mask.bool()


def calibrated_masks(gm: GraphModule, data: Sequence | None, targets: Sequence[Any], owner: str,
                     profile: OWL | None) -> tuple[int, dict[str, Any]]:
    """Mask every target from calibration statistics, block by block; (masks created, statistics)."""
    by_name = {t.layer.name: t for t in targets}
    layers = [t.layer for t in targets]
    sparsities = {t.layer.name: t.sparsity for t in targets}
    stats: dict[str, Any] = {}
    if profile is not None:  # two walks: a generator would be used up by the first and give the second nothing
        data = calibration_batches(data, owner)
        ratios = walk(gm, layers, data, lambda group, inputs: _ratios(gm, group, inputs, profile),
                      owner=owner, hessian=False).layers
        sizes = {name: stored_weight(gm, t.layer).numel() for name, t in by_name.items()}
        target = sum(sparsities[n] * sizes[n] for n in sizes) / sum(sizes.values())
        sparsities = owl_sparsities(ratios, sizes, target, profile.spread)
        stats["outlier_ratio"] = {n: round(r, 6) for n, r in ratios.items()}
    created = [0]

    def prune(group: Group, inputs: InputStats) -> dict[str, float]:
        for layer in group.layers:
            created[0] += set_mask(gm, layer, keep_for(gm, by_name[layer.name], sparsities[layer.name], inputs.norms))
        return {layer.name: round(sparsity_of(get_mask(gm, layer)), 6) for layer in group.layers}

    report = walk(gm, layers, data, prune, owner=owner, hessian=False)
    stats.update(calibration_batches=report.batches, calibration_peak_bytes=report.peak_held_bytes,
                 **report.padding_stats())
    return created[0], {"layers": report.layers, **stats}


def _ratios(gm: GraphModule, group: Group, inputs: InputStats, profile: OWL) -> dict:
    result = {}
    for layer in group.layers:
        scores = element_scores(stored_weight(gm, layer), get_mask(gm, layer), layer.kind, "wanda", inputs.norms)
        result[layer.name] = outlier_ratio(scores, profile.threshold)
    return result
