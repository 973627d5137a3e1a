"""PruneChannels: remove whole channels, shrinking every layer that produces or consumes them.

    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, method="l1")], example_inputs=(x,))

The channel dependency graph (`ChannelGraph`) says which channels must go together; this pass
scores them, picks the lowest per group (or globally), removes them physically (smaller weights,
BN statistics, group counts, attention heads, view sizes), and optionally refits the consumers by
least squares on calibration data (He et al. 2017). Groups that cannot be pruned are reported in
`stats["frozen"]` with the reason, as are groups that round_to leaves whole (no multiple of it fits
between the channels they must keep and their width). With reconstruct, `stats["reconstructed"]` lists the
refitted layers and `stats["not_reconstructed"]` maps each other layer whose inputs shrank to why it was left as
it is (a weight another node reads, a tied head, a transposed conv, a fake-quantized weight, experts).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.analyses.ownership import ParamOwnership
from fxcompress.channels.capture import Sampling
from fxcompress.channels.graph import ATTENTION_MODES, ChannelGraph, ChannelGroup
from fxcompress.channels.graph.ops import rule_of
from fxcompress.channels.refit import capture_targets, refit
from fxcompress.channels.select import DATA_METHODS, METHODS, Selection, choose_removal, prunable_units
from fxcompress.channels.surgery import apply_removal
from fxcompress.config import (Boolean, Callables, Interval, MappingOf, Options, Regex, SubclassOf, TupleOf,
                               validate)
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import name_matches
from fxcompress.pass_base import Pass, PassContext, PassResult


_AMOUNT = Interval(float, 0.0, 1.0, hi_open=True)
_PATTERN = (Regex(), SubclassOf(nn.Module))  # a layer-name regex or a module type


@dataclass(frozen=True, kw_only=True)
class PruneChannels(Pass):
    """Remove `amount` of each layer's output channels (or of all of them ranked together with
    `global_`). Coupled channels count once: the convs feeding a residual stream share its channels
    and lose the same ones; in a DenseNet block, each layer loses its share of the channels it adds.

    amount: a fraction in [0, 1), or {regex over layer names: fraction} (first match wins; groups
        whose layers match no pattern are left alone; a pattern matching no selected prunable layer
        is a ConfigError).
    method: "l1" | "l2" (filter norms summed over a group) | "random" | "greedy" (ThiNet) |
        "lasso" (He et al.) | a callable `(gm, graph, group) -> scores` (one per `group.prunable`,
        higher = keep).
    reconstruct: refit consumer layers by least squares on `calibration_data` (batches as the calibration walk
        takes them: tensors, tuples, or dicts bound to the graph's inputs by name; their sizes beyond the
        batch dim may differ, as sequences of different lengths do). Layers left as they are are named in
        `stats["not_reconstructed"]` with the reason.
    select: regexes (full match over layer names) or module types of the layers whose output
        channels may be pruned; empty = every layer. Each must match a prunable layer.
    keep: regexes or module types of layers that must not change at all. Each must match a layer.
    min_channels / round_to: every group keeps at least `min_channels`, and a multiple of
        `round_to`, of its channels (never none).
    prune_normalized: also remove the channels that are frozen only for exactness — those a layer
        norm or RMS norm normalizes over (transformer residual streams; F.rms_norm, nn.RMSNorm, or
        written out as Llama and T5 write it, `x * rsqrt(x.pow(2).mean(-1) + eps)`) and those whose
        width a computation reads (a scale from `x.size(-1)`); valid, but the outputs change even
        for zero channels; reconstruction or fine-tuning recovers it. Off by default.
    prune_outputs: also remove channels that reach the model's output (a headless encoder's hidden
        states, as Torch-Pruning does when its output layers are not ignored): the output shape
        changes, so compile verifies the rest and takes the new shapes. Off by default.
    attention: how hand-written attention (q/k/v viewed as (heads, head_dim), then matmul and
        softmax or F.scaled_dot_product_attention) is pruned. "head_dims" (default): the same
        positions of every head go; head_dim shrinks, so a scale computed from it would change
        (those channels are inexact; sdpa's default scale is pinned to the unpruned one). "heads":
        whole heads go (a head's q, k, v rows and out-projection columns together); num_heads
        shrinks, head_dim and the scale stay, the kept heads' outputs are unchanged (min_channels
        and round_to count heads). Either mode applies to every view of a channel dim as
        (groups, per_group) dims, a channel shuffle's too. nn.MultiheadAttention always loses
        whole heads. Grouped-query attention (repeat_kv, or sdpa's enable_gqa) loses a KV head
        with the query heads reading it; an sdpa attn_mask with a head dim (T5's position bias)
        loses the same heads, and freezes them under "head_dims"; rotary embeddings' head dims
        (rotate_half) go in pairs (j, j + head_dim / 2) with their frequencies.
    """

    amount: float | Mapping[str, float] = 0.5
    method: str | Callable = "l1"
    reconstruct: bool = False
    select: tuple = ()
    keep: tuple = ()
    min_channels: int = 1
    round_to: int = 1
    global_: bool = False
    seed: int = 0
    max_samples: int = 4096
    prune_normalized: bool = False
    prune_outputs: bool = False
    attention: str = "head_dims"

    preserves: ClassVar[tuple[type, ...]] = ()

    constraints: ClassVar[dict] = {
        "amount": (_AMOUNT, MappingOf(Regex(), _AMOUNT, min_len=1)), "method": (Options(*METHODS), Callables()),
        "reconstruct": (Boolean(),), "select": (TupleOf(*_PATTERN),), "keep": (TupleOf(*_PATTERN),),
        "min_channels": (Interval(int, 1),), "round_to": (Interval(int, 1),), "global_": (Boolean(),),
        "seed": (Interval(int, 0, 2 ** 32 - 2),),  # numpy and scikit-learn seeds; seed + 1 is used too
        "max_samples": (Interval(int, 16),), "prune_normalized": (Boolean(),),
        "prune_outputs": (Boolean(),), "attention": (Options(*ATTENTION_MODES),),
    }

    def __post_init__(self) -> None:
        validate(self)

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        needs_data = self.reconstruct or self.method in DATA_METHODS
        if needs_data and not ctx.calibration_data:
            raise PreconditionError(f"PruneChannels(method={self.method!r}, reconstruct={self.reconstruct}) "
                                    "needs calibration_data= in compile()")

    @property
    def changes_output_shapes(self) -> bool:  # compile then checks the rest and takes the new shapes
        return self.prune_outputs

    def unknown_ops(self, gm: GraphModule) -> list[Node]:
        """The call nodes the channel op tables do not know: each freezes the channels it touches."""
        return [n for n in gm.graph.nodes if n.op.startswith("call_") and rule_of(gm, n)[0] is None]

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        cg = ctx.get(ChannelGraph, attention=self.attention)
        units = prunable_units(cg, self.prune_normalized, self.prune_outputs)
        self._check_patterns(gm, cg, units)
        groups, skipped = self._eligible(gm, units)
        sampling = Sampling(self.max_samples, self.seed)
        selection = Selection(self.method, self.global_, self.min_channels, self.round_to, sampling)
        choice = choose_removal(gm, cg, groups, selection, ctx.calibration_data)
        removed = choice.removed
        before = sum(p.numel() for p in gm.parameters())
        report = _frozen_report(cg, skipped, self.prune_normalized, self.prune_outputs)
        for label, why in choice.held.items():  # a partly frozen group: its frozen reason, then round_to's
            report[label] = f"{report[label]}; {why}" if label in report else why
        stats: dict[str, Any] = {"groups": len(cg.groups), "frozen": report}
        if choice.scored_by_l1:
            stats["scored_by_l1"] = choice.scored_by_l1
        if not removed.any():
            return PassResult(changed=False, stats={**stats, "channels_removed": 0})
        # ParamOwnership names every node reading a consumer's weight or bias: one read by anything but its
        # layer is not refitted, since the fit would change what that node computes
        targets = (capture_targets(gm, cg, removed, ctx.calibration_data, sampling, progress=ctx.progress,
                                   ownership=ctx.get(ParamOwnership))
                   if self.reconstruct else None)
        touched = apply_removal(gm, cg, removed)
        if targets is not None:
            stats["reconstructed"] = refit(gm, targets, progress=ctx.progress)
            # the consumers whose inputs shrank but which keep their weights, each with why (a reader of the
            # weight, a tied head, ...): otherwise seen only by their absence from `reconstructed`
            stats["not_reconstructed"] = targets.skipped
            if targets.padding_included:  # refitted on rows that keep padded positions (the capture warned)
                stats["calibration_padding_included"] = list(targets.padding_included)
        after = sum(p.numel() for p in gm.parameters())
        outputs = sum(int(removed[cg.labels[l.out_ids]].sum()) for l in cg.layers if l.out_ids is not None)
        stats.update(groups_pruned=int(sum(removed[g.classes].any() for g in cg.groups)),
                     channels_removed=outputs, params_before=before, params_after=after)
        return PassResult(changed=True, params_touched=tuple(touched), stats=stats)

    # ---- which groups may lose channels, and how many ----------------------------------------
    def _check_patterns(self, gm: GraphModule, cg: ChannelGraph, units: list[ChannelGroup]) -> None:
        """Every pattern of select, keep and a per-layer amount must name a layer it can act on: one
        that matches nothing would remove nothing (or keep nothing) without a word."""
        every = sorted({layer.name for layer in cg.layers})
        prunable = sorted({name for unit in units for name in unit.producers})
        selected = [name for name in prunable if not self.select or name_matches(gm, name, self.select)]
        amounts = tuple(self.amount) if isinstance(self.amount, Mapping) else ()
        checks = (("select", self.select, prunable, "prunable layers"), ("keep", self.keep, every, "layers"),
                  ("amount", amounts, selected, "selected prunable layers"))
        for field, patterns, names, what in checks:
            for pattern in patterns:
                if any(name_matches(gm, name, (pattern,)) for name in names):
                    continue
                shown = pattern.__name__ if isinstance(pattern, type) else repr(pattern)
                elsewhere = [name for name in every if name_matches(gm, name, (pattern,))]
                note = f" (it matches {elsewhere}: frozen, see fxcompress.channel_graph, or not selected)"
                raise ConfigError(f"PruneChannels.{field}: {shown} matches none of the {what}, which are "
                                  f"{names}{note if elsewhere else ''}")

    def _eligible(self, gm: GraphModule, units: list[ChannelGroup]) -> tuple[list[tuple[ChannelGroup, float]], dict]:
        eligible, skipped = [], {}
        for unit in units:
            if any(name_matches(gm, name, self.keep) for name in (*unit.producers, *unit.consumers)):
                skipped[unit.label] = "a layer in keep= would change"
                continue
            amount = self._amount(gm, unit)
            if amount is not None and amount > 0:
                eligible.append((unit, amount))
        return eligible, skipped

    def _amount(self, gm: GraphModule, g: ChannelGroup) -> float | None:
        producers = [p for p in g.producers if not self.select or name_matches(gm, p, self.select)]
        if not producers:
            return None
        if not isinstance(self.amount, Mapping):
            return float(self.amount)
        for pattern, value in self.amount.items():
            if any(re.fullmatch(pattern, p) for p in producers):
                return float(value)
        return None


def _frozen_report(cg: ChannelGraph, skipped: dict, prune_normalized: bool, prune_outputs: bool) -> dict[str, str]:
    """{group label: reason} for the groups with layers whose channels cannot all be pruned."""
    def held(g: ChannelGroup) -> int:
        return len(g.classes) - len(g.prunable) - len(g.released(prune_normalized, prune_outputs))
    report = {g.label: g.frozen for g in cg.groups if g.frozen and g.producers and held(g)}
    report.update(skipped)
    return report
