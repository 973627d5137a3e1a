"""Which weights to prune: importance scores per element or per group, and exact lowest-k selection.

A *group* is the unit a granularity removes at once:

* element - one weight;
* kernel  - one 2-D (or 1-D / 3-D) kernel of a conv, i.e. one (out, in) pair;
* filter  - everything that produces one output channel (rows of a linear weight);
* channel - everything that reads one input channel (columns of a linear weight).

A group's score is the L1 norm of its weights ("abs" and "l1"), their L2 norm ("l2"), or the sum
of a user callable's per-element scores. "wanda" (Sun et al. 2023) scores each weight |W_ij| *
||X_j||_2, the norm of its input channel over the calibration tokens: it needs calibration
statistics, so it goes through `element_scores` with the norms, never `group_scores`. Selection
removes exactly round(sparsity * groups) groups, so the sparsity asked for is the sparsity obtained (a threshold would keep ties).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError, PreconditionError
from ..layers import KINDS

GRANULARITIES = ("element", "kernel", "filter", "channel")
IMPORTANCES = ("abs", "l1", "l2", "wanda")
CALIBRATED_IMPORTANCES = ("wanda",)  # these read per-input-channel statistics of the calibration data
Importance = str | Callable[[torch.Tensor], torch.Tensor]


def group_dims(granularity: str, kind: str, ndim: int, layer: str = "") -> tuple[int, ...]:
    """The weight dimensions that index a group (the others are reduced into its score)."""
    if granularity == "element":
        return tuple(range(ndim))
    if granularity == "kernel":
        if not KINDS[kind].is_conv:
            raise PreconditionError(f"granularity 'kernel' needs a conv layer; {layer or 'the layer'} is {kind}")
        return (0, 1)
    if granularity == "channel" and KINDS[kind].in_dim is None:
        raise PreconditionError(f"granularity 'channel' needs input channels; {layer or 'the layer'} is {kind} "
                                "(its rows are looked up, not summed over inputs)")
    # ConvTranspose stores its weight as (in, out/groups, *kernel): the table says which dim is which.
    return (KINDS[kind].out_dim,) if granularity == "filter" else (KINDS[kind].in_dim,)


def group_scores(weight: torch.Tensor, dims: Sequence[int], importance: Importance) -> torch.Tensor:
    """One score per group, shaped like `weight` with the reduced dimensions kept at size 1."""
    reduce = [d for d in range(weight.ndim) if d not in dims]
    weight = weight.detach().float()
    if isinstance(importance, str) and importance in CALIBRATED_IMPORTANCES:
        raise PreconditionError(f"importance {importance!r} needs the inputs' statistics: use it as the pass's "
                                f"importance with compile(..., calibration_data=...), not in group scores")
    if callable(importance):
        scores = importance(weight)
        if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ConfigError(f"importance callable must return scores shaped like the weight "
                              f"{tuple(weight.shape)}, got {got}")
        scores = scores.detach().float()
        return scores.sum(reduce, keepdim=True) if reduce else scores
    if importance == "l2":
        return weight.pow(2).sum(reduce, keepdim=True).sqrt() if reduce else weight.abs()
    return weight.abs().sum(reduce, keepdim=True) if reduce else weight.abs()


def pruned_groups(mask: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Groups of an existing mask that are entirely pruned (bool, shaped like the group scores)."""
    reduce = [d for d in range(mask.ndim) if d not in dims]
    alive = mask.ne(0)
    return ~alive.any(dim=tuple(reduce), keepdim=True) if reduce else ~alive


def keep_highest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """A bool tensor shaped like `scores`: False for exactly the `n_prune` lowest scores."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        keep[torch.topk(scores.flatten(), n_prune, largest=False).indices] = False
    return keep.view(scores.shape)


def count_to_prune(sparsity: float, groups: int) -> int:
    """round(sparsity * groups), as torch.nn.utils.prune counts it."""
    return min(groups, round(sparsity * groups))


def masked_scores(weight: torch.Tensor, mask: torch.Tensor | None, dims: Sequence[int],
                  importance: Importance) -> torch.Tensor:
    """Group scores of `weight * mask`; groups the mask already pruned score -inf, so they go first
    and a new selection never revives them."""
    scores = group_scores(weight if mask is None else weight.detach() * mask, dims, importance)
    return scores if mask is None else scores.masked_fill(pruned_groups(mask, dims), float("-inf"))


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor, kind: str) -> torch.Tensor:
    """|W| times the L2 norm of each weight's input channel (Wanda), shaped like the weight."""
    in_dim = KINDS[kind].in_dim
    if in_dim is None:
        raise PreconditionError(f"importance 'wanda' needs input channels; a {kind} weight has none")
    shape = [1] * weight.ndim
    shape[in_dim] = -1
    return weight.detach().float().abs() * norms.to(weight.device, torch.float32).view(shape)


def element_scores(weight: torch.Tensor, mask: torch.Tensor | None, kind: str, importance: Importance,
                   norms: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight scores of `weight * mask` (pruned weights -inf): Wanda's with `norms`, else the
    importance's element-level scores."""
    masked = weight.detach().float() if mask is None else weight.detach().float() * mask
    if importance == "wanda":
        if norms is None:
            raise PreconditionError("importance 'wanda' needs the input-channel norms of the calibration data")
        scores = wanda_scores(masked, norms, kind)
    else:
        scores = group_scores(masked, tuple(range(weight.ndim)), importance)
    return scores if mask is None else scores.masked_fill(mask == 0, float("-inf"))
