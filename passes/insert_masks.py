"""InsertMasks: magnitude pruning as mask nodes in the graph (Han et al. 2015, "Learning both weights
and connections").

    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9, scope="global")], example_inputs=(x,))

Every selected linear / conv weight goes through `mul(weight, <module>.weight_mask)` before the
layer uses it. Compiling a masked GraphModule again with a higher sparsity advances the same masks
(a pruned weight is never revived, no second mul is stacked). With `schedule=AGP(...)`, compile
inserts the masks at the schedule's initial sparsity and `update_masks(gm, step)`, called from any
training loop, raises them along the Zhu & Gupta curve.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from fxcompress.analyses import ShapeInfo
from fxcompress.calibration.masks import calibrated_masks, check_mask_config, keep_for, needs_calibration
from fxcompress.config import Callables, Interval, Options, Regex, TupleOf, TypeOf, check_int, validate
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import (TYPES_FIELD, Layer, check_float_weight, check_tied_rules, kind_names, layer_node,
                               select_layers)
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.pruning.importance import (GRANULARITIES, IMPORTANCES, Importance, count_to_prune, group_layout,
                                           masked_scores, split_groups)
from fxcompress.pruning.masks import get_mask, set_mask, sparsity_of, stored_weight
from fxcompress.pruning.nm import NMPattern, nm_pattern
from fxcompress.pruning.owl import OWL
from fxcompress.pruning.schedule import AGP
from fxcompress.pruning.selection import LowestN
from fxcompress.rules import RULES_FIELD, Field, RuleSchema, choice, real_list

# The origin documents' rule form: (parameter pattern, granularity, sparsity per stage[, importance]).
MASK_RULES = RuleSchema("InsertMasks.rules", [
    Field("granularity", choice(*GRANULARITIES)),
    Field("sparsity", real_list(0.0, 1.0)),
    Field("importance", choice(*IMPORTANCES, allow_callable=True), default=None),  # None: the pass's own
])
_FRACTION = Interval(float, 0.0, 1.0)
# PassContext.each (a progress bar naming each layer) or None for a plain loop
Each = Callable[[Iterable, str, Callable], Iterator] | None


@dataclass(frozen=True)
class Target:
    """What one layer is pruned to."""

    layer: Layer
    granularity: str
    sparsity: float
    importance: Importance


@dataclass(frozen=True, kw_only=True)
class InsertMasks(Pass):
    """Prune selected linear / conv weights with mask nodes.

    sparsity     fraction of groups to prune, or one fraction per stage (picked by `stage`)
    granularity  "element", "kernel" (conv only), "filter", "channel", or "N:M" ("2:4", "4:8": in every M
                 consecutive input weights keep the N of highest importance)
    importance   "abs" / "l1" (L1 norm of a group), "l2", a callable weight -> per-element scores, or
                 "wanda" (|W| * input-channel norm on compile's calibration_data, per output row)
    profile      OWL(...): per-layer sparsities from each layer's outlier ratio (calibrated), mean kept
    scope        "local": every layer to its sparsity; "global": one threshold across the layers
    select       full-match regex over layer names ("fc1", "features\\.\\d+"); None: every layer
    types        layer kinds ("linear", "conv2d", ...) or module classes (nn.Conv2d) to restrict to
    rules        per-parameter rules (pattern, granularity, sparsities[, importance]): a list or a
                 text / YAML / JSON file; they replace sparsity / granularity for the layers they match
    stage        which entry of each sparsity list applies
    schedule     AGP(...) for gradual pruning driven by `update_masks(gm, step)`
    """

    sparsity: float | tuple[float, ...] = 0.5
    granularity: str = "element"
    importance: Importance = "abs"
    scope: str = "local"
    select: str | None = None
    types: tuple[Any, ...] = ()
    rules: Any = None
    stage: int = 0
    schedule: AGP | None = None
    profile: OWL | None = None

    preserves: ClassVar[tuple[type, ...]] = (ShapeInfo,)

    constraints: ClassVar[dict] = {
        "sparsity": (_FRACTION, TupleOf(_FRACTION, min_len=1)),
        "granularity": (Options(*GRANULARITIES), NMPattern()),
        "importance": (Options(*IMPORTANCES), Callables()),
        "scope": (Options("local", "global"),),
        "select": (Regex(), None),
        "types": TYPES_FIELD,
        "rules": RULES_FIELD,
        "stage": (Interval(int, 0),),
        "schedule": (TypeOf(AGP, what="an AGP(...) schedule"), None),
        "profile": (TypeOf(OWL, what="an OWL(...) profile"), None),
    }

    def __post_init__(self) -> None:
        validate(self)
        sparsities = tuple(self.sparsity) if isinstance(self.sparsity, (list, tuple)) else (self.sparsity,)
        object.__setattr__(self, "sparsity", sparsities if isinstance(self.sparsity, (list, tuple)) else self.sparsity)
        _stage_value(sparsities, self.stage, "InsertMasks.sparsity")
        object.__setattr__(self, "types", kind_names(self.types))
        check_mask_config("InsertMasks", importance=self.importance, granularity=self.granularity, scope=self.scope,
                          sparsity=self.sparsity, profile=self.profile, schedule=self.schedule)
        if self.rules is not None:
            rules = MASK_RULES.load(self.rules)
            if self.scope == "global":
                raise ConfigError("InsertMasks.rules give per-layer sparsities; they need scope='local'")
            for rule in rules.rules:
                _stage_value(rule["sparsity"], self.stage, rule.origin)
            object.__setattr__(self, "rules", rules)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        step = self.schedule.begin if self.schedule is not None else None
        targets = self.targets(gm, step)
        before = {t.layer.name: _mask_zeros(gm, t.layer) for t in targets}
        if needs_calibration(self.importance, self.profile):  # Wanda / OWL: block by block on calibration data
            created, extra = calibrated_masks(gm, ctx.calibration_data, targets, "InsertMasks", self.profile)
            sparsities = extra.pop("layers")
        else:
            created, sparsities, extra = *self._apply(gm, targets, ctx.each), {}
        changed = created > 0 or any(_mask_zeros(gm, t.layer) != before[t.layer.name] for t in targets)
        total = sum(stored_weight(gm, t.layer).numel() for t in targets)
        pruned = sum(_mask_zeros(gm, t.layer) for t in targets)
        return PassResult(changed=changed, params_touched=tuple(t.layer.weight for t in targets),
                          stats={"sparsity": round(pruned / max(total, 1), 6), "masks_created": created,
                                 "layers": sparsities, **extra})

    def update_masks(self, gm: GraphModule, step: int) -> dict[str, float]:
        """Advance the masks `compile` inserted to this step's sparsity; returns each layer's sparsity.

        Call it once per step (or epoch) from a training loop. Without a schedule the masks go
        straight to the pass's sparsity; with one they follow it, and between the schedule's
        update steps nothing is recomputed.
        """
        check_int("update_masks", "step", step, lo=0)
        targets = self.targets(gm, step)
        missing = [t.layer.name for t in targets if get_mask(gm, t.layer) is None]
        if missing:
            raise PreconditionError(f"update_masks: layers {missing} have no mask; compile the model with this "
                                    f"InsertMasks pass first")
        if self.schedule is not None and not self.schedule.updates_at(step):
            return {t.layer.name: sparsity_of(get_mask(gm, t.layer)) for t in targets}
        return self._apply(gm, targets)[1]

    def targets(self, gm: GraphModule, step: int | None = None) -> list[Target]:
        """The layers this pass prunes and what each is pruned to (at `step` of the schedule)."""
        layers = self._candidates(gm)
        if self.rules is None:
            sparsities = self.sparsity if isinstance(self.sparsity, tuple) else (self.sparsity,)
            final = _stage_value(sparsities, self.stage, "InsertMasks.sparsity")
            plan = [(layer, self.granularity, final, self.importance) for layer in layers]
        else:
            check_tied_rules(gm, self.rules, layers)
            assigned = self.rules.assign(layer.weight for layer in layers)
            plan = [(layer, rule["granularity"], _stage_value(rule["sparsity"], self.stage, rule.origin),
                     rule["importance"] or self.importance)
                    for layer in layers if (rule := assigned.get(layer.weight)) is not None]
        return [Target(layer, granularity, self._scheduled(final, step), importance)
                for layer, granularity, final, importance in plan]

    def _scheduled(self, final: float, step: int | None) -> float:
        return final if self.schedule is None or step is None else self.schedule.sparsity(final, step)

    def _candidates(self, gm: GraphModule) -> list[Layer]:
        layers = select_layers(gm, "InsertMasks", self.types, self.select, required=True, warn_tied=True)
        for layer in layers:  # a mask may sit on a quantized weight, not on encoded bytes or integer codes
            check_float_weight(gm, layer, "InsertMasks", behind_quantizer=True)
        return layers

    def _apply(self, gm: GraphModule, targets: Sequence[Target], each: Each = None) -> tuple[int, dict[str, float]]:
        """Set every target's mask, one layer at a time: a layer's scores are freed before the next
        layer's are made, so the pass holds no more than one layer's scores (global scope too)."""
        each = each or (lambda items, what, name: items)
        if self.scope == "global":
            selection = _global_selection(gm, targets, each)
            keeps = (_scored_keep(gm, t, lambda scores: selection) for t in each(targets, "masks", _target_name))
        else:
            keeps = (_local_keep(gm, t) for t in each(targets, "masks", _target_name))
        created = 0
        for t, keep in zip(targets, keeps):  # each keep is made, applied and dropped before the next
            created += set_mask(gm, t.layer, keep)
        return created, {t.layer.name: round(sparsity_of(get_mask(gm, t.layer)), 6) for t in targets}


def _scores(gm: GraphModule, target: Target) -> torch.Tensor:
    """Group scores of the layer's masked weight (groups pruned before score -inf)."""
    dims, split = _layout(gm, target)
    return masked_scores(stored_weight(gm, target.layer), get_mask(gm, target.layer), dims, target.importance, split)


def _layout(gm: GraphModule, target: Target) -> tuple[tuple[int, ...], int]:
    """`group_layout` of the target: a grouped conv's channels are real input channels, not dim 1 of its
    weight (which holds one group's), so the layer's conv groups are read from its call."""
    layer = target.layer
    grouped = layer.is_conv and target.granularity in ("channel", "filter")  # the only groups conv groups change
    return group_layout(target.granularity, layer.kind, stored_weight(gm, layer).ndim, layer.name,
                        _conv_groups(gm, layer) if grouped else 1)


def _conv_groups(gm: GraphModule, layer: Layer) -> int:
    """The `groups` of a conv layer's call: its module's, or the functional call's argument 6 / keyword
    (conv and conv_transpose alike take it there; its default is 1)."""
    node = layer_node(gm, layer)
    if node.op == "call_module":
        groups = getattr(gm.get_submodule(node.target), "groups", None)
    else:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise PreconditionError(f"InsertMasks: layer {layer.name!r} ({layer.kind}) has conv groups {groups!r}, "
                                "not an int the graph fixes; channel and filter groups need it")
    return groups


def _local_keep(gm: GraphModule, target: Target) -> torch.Tensor:
    if nm_pattern(target.granularity) is not None:
        return keep_for(gm, target, target.sparsity)
    # the histogram selection of the global scope on one layer: torch.topk of 90% of a layer's groups is
    # several times slower and holds their values and int64 indices; same groups, ties earliest first
    return _scored_keep(gm, target, lambda scores: LowestN.find(
        lambda: [(target.layer.name, scores)], count_to_prune(target.sparsity, scores.numel())))


def _scored_keep(gm: GraphModule, target: Target, selection: Callable[[torch.Tensor], LowestN]) -> torch.Tensor:
    """The layer's keep mask from its scores and `selection(scores)`. The mask outlives the scores, so it
    is allocated first: made after them it would sit above the hole they leave, and glibc's heap could
    neither shrink past it nor fit the next layer's larger scores into that hole."""
    weight = stored_weight(gm, target.layer)
    keep = torch.empty(_score_shape(gm, target), dtype=torch.bool, device=weight.device)
    scores = _scores(gm, target)
    keep = selection(scores).keep(scores, target.layer.name, out=keep)
    # a grouped conv's scores index its weight viewed as [groups, dim 0 / groups, ...]: back to the weight's shape
    return keep.expand(split_groups(weight, _layout(gm, target)[1]).shape).reshape(weight.shape)


def _score_shape(gm: GraphModule, target: Target) -> tuple[int, ...]:
    """The shape of a layer's group scores: the (group-split) weight's, with the dims reduced into a group at 1."""
    dims, split = _layout(gm, target)
    view = split_groups(stored_weight(gm, target.layer), split)
    return tuple(size if d in dims else 1 for d, size in enumerate(view.shape))


def _global_selection(gm: GraphModule, targets: Sequence[Target], each: Each) -> LowestN:
    """One ranking across every target layer (torch.nn.utils.prune.global_unstructured's rule), found
    without holding all the scores at once: exactly the lowest round(sparsity x groups) groups, ties at
    the threshold going in layer order, then index order (as a stable sort of all scores ranks them)."""
    groups = sum(math.prod(_score_shape(gm, t)) for t in targets)
    # a few scores are ranked in one visit; many are counted in two (pruning/selection.py)
    passes = iter(("global scores (1/2)", "global scores (2/2)") if LowestN.streams(groups) else ("global scores",))

    def batches():
        return ((t.layer.name, _scores(gm, t)) for t in each(targets, next(passes), _target_name))
    return LowestN.find(batches, count_to_prune(targets[0].sparsity, groups))


def _target_name(target: Target) -> str:
    return target.layer.name


def _mask_zeros(gm: GraphModule, layer: Layer) -> int:
    mask = get_mask(gm, layer)
    return 0 if mask is None else mask.numel() - mask.count_nonzero().item()


def _stage_value(values: Sequence[float], stage: int, origin: str) -> float:
    """The sparsity of `stage`; a single value holds at every stage."""
    if len(values) == 1:
        return values[0]
    if stage >= len(values):
        raise ConfigError(f"{origin}: stage {stage} asked for, but only {len(values)} sparsities are given "
                          f"({', '.join(map(str, values))})")
    return values[stage]

