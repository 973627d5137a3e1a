"""Which weights to prune: importance scores per element or per group, and exact lowest-k selection.

A *group* is the unit a granularity removes at once:

* element - one weight;
* kernel  - one 2-D (or 1-D / 3-D) kernel of a conv, i.e. one (out, in) pair;
* filter  - everything that produces one output channel (rows of a linear weight);
* channel - everything that reads one input channel (columns of a linear weight).

A grouped convolution stores only its own group's channels along the weight's dim 1 (a conv's
inputs, [out, in/groups, ...]; a transposed conv's outputs, [in, out/groups, ...]): index j there
is a different channel in each group. Its channels (a conv's) or filters (a transposed conv's) are
therefore grouped on the weight viewed as [groups, dim 0 / groups, dim 1, ...], so that each group
is one real channel: channel g * (in/groups) + j, numbered (and its ties broken) in that order.

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
from .selection import LowestN

GRANULARITIES = ("element", "kernel", "filter", "channel")
IMPORTANCES = ("abs", "l1", "l2", "wanda")
CALIBRATED_IMPORTANCES = ("wanda",)  # these read per-input-channel statistics of the calibration data
Importance = str | Callable[[torch.Tensor], torch.Tensor]


def group_layout(granularity: str, kind: str, ndim: int, layer: str = "",
                 groups: int = 1) -> tuple[tuple[int, ...], int]:
    """(dims, split): the dims that index a group in the weight viewed by `split_groups(weight, split)`.

    `split` is 1 (the weight as it is) except for the channels of a grouped conv and the filters of
    a grouped transposed conv, whose dim 1 holds one group's channels only (the module docstring):
    there dim 0 is split into (groups, dim 0 / groups) and the groups are indexed by dims (0, 2).
    """
    dims = group_dims(granularity, kind, ndim, layer)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise PreconditionError(f"{layer or 'the layer'}: conv groups must be a positive int, got {groups!r}")
    if groups > 1 and granularity in ("channel", "filter") and dims == (1,) and KINDS[kind].is_conv:
        return (0, 2), groups
    return dims, 1


def split_groups(tensor: torch.Tensor, split: int) -> torch.Tensor:
    """`tensor` (weight-shaped) viewed as [split, dim 0 / split, ...]; itself when `split` is 1."""
    if split == 1:
        return tensor
    if tensor.shape[0] % split:
        raise PreconditionError(f"a weight of shape {tuple(tensor.shape)} cannot hold {split} conv groups along dim 0")
    return tensor.unflatten(0, (split, tensor.shape[0] // split))


def group_dims(granularity: str, kind: str, ndim: int, layer: str = "") -> tuple[int, ...]:
    """The weight dimensions that index a group (the others are reduced into its score), for a layer
    without conv groups (a grouped conv's channels need `group_layout`)."""
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


def group_scores(weight: torch.Tensor, dims: Sequence[int], importance: Importance, split: int = 1) -> torch.Tensor:
    """One score per group, shaped like `split_groups(weight, split)` with the reduced dimensions kept at
    size 1 (`dims` index that view). A callable importance sees the weight itself, never the view."""
    reduce = [d for d in range(weight.ndim + (split > 1)) if d not in dims]
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
        scores = split_groups(scores.detach().float(), split)
        return scores.sum(reduce, keepdim=True) if reduce else scores
    weight = split_groups(weight, split)
    if importance == "l2":
        return weight.pow(2).sum(reduce, keepdim=True).sqrt() if reduce else weight.abs()
    return weight.abs().sum(reduce, keepdim=True) if reduce else weight.abs()


def pruned_groups(mask: torch.Tensor, dims: Sequence[int], split: int = 1) -> torch.Tensor:
    """Groups of an existing mask that are entirely pruned (bool, shaped like the group scores)."""
    mask = split_groups(mask, split)
    reduce = [d for d in range(mask.ndim) if d not in dims]
    alive = mask.ne(0)
    return ~alive.any(dim=tuple(reduce), keepdim=True) if reduce else ~alive


def keep_highest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """A bool tensor shaped like `scores`: False for exactly the `n_prune` lowest scores, ties at the
    threshold earliest (flat index) first, as InsertMasks's local and global scopes choose them:
    torch.topk breaks such ties in no specified order (on CPU not the earliest), so the same layer
    would lose other weights under OWL or sensitivity than under InsertMasks."""
    return LowestN.find(lambda: [("", scores)], n_prune).keep(scores)


def count_to_prune(sparsity: float, groups: int) -> int:
    """round(sparsity * groups), as torch.nn.utils.prune counts it."""
    return min(groups, round(sparsity * groups))


def masked_scores(weight: torch.Tensor, mask: torch.Tensor | None, dims: Sequence[int],
                  importance: Importance, split: int = 1) -> torch.Tensor:
    """Group scores of `weight * mask`; groups the mask already pruned score -inf, so they go first
    and a new selection never revives them. `dims` / `split`: as `group_layout` gives them."""
    scores = group_scores(weight if mask is None else weight.detach() * mask, dims, importance, split)
    return scores if mask is None else scores.masked_fill(pruned_groups(mask, dims, split), float("-inf"))


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
