"""SparseGPT: one-shot pruning of language models with second-order reconstruction (Frantar &
Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

    gm = fxcompress.compile(model, [SparseGPT(sparsity=0.5)], example_inputs=(ids,),
                            calibration_data=batches)

Layers are calibrated block by block (`fxcompress.calibration.walk`): each sees its inputs as the
already-pruned layers before it produce them. Every selected layer gets a mask node (as
InsertMasks puts one), and its kept weights are updated column by column through the damped
inverse Hessian of its inputs, so its output on the calibration data changes as little as
possible. The mask is SparseGPT's own OBS choice, magnitude, Wanda or any per-weight score; a
mask already in the graph is kept (what it pruned stays pruned) and only what is pruned now is
compensated, since InsertMasks zeroed the stored weights it pruned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch.fx import GraphModule

from fxcompress.analyses import ShapeInfo
from fxcompress.calibration import walk
from fxcompress.calibration.second_order import BLOCKSIZE
from fxcompress.calibration.sparsegpt import SPARSEGPT_IMPORTANCES, reconstruct_layer
from fxcompress.config import Callables, Interval, Options, Regex, validate
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import TYPES_FIELD, check_float_weight, kind_names, select_layers
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.pruning.masks import get_mask, stored_weight
from fxcompress.pruning.nm import NMPattern, nm_pattern


@dataclass(frozen=True, kw_only=True)
class SparseGPT(Pass):
    """Prune linear layers with masks and second-order weight updates on calibration data.

    sparsity     fraction of each layer's weights to prune (not read with an N:M pattern)
    granularity  "element", or "N:M" ("2:4", "4:8"): at most N kept in every M consecutive input weights
    importance   "sparsegpt" (OBS saliency w^2 / [H^-1]_jj^2, chosen block by block during the update),
                 "abs" (magnitude, per layer), "wanda" (|W| x input norm, per output row), or a callable
                 weight -> per-element scores (lowest pruned, per layer)
    blocksize    columns per lazy-update block (the paper's 128)
    percdamp     damping of the Hessian as a fraction of its mean diagonal, raised x10 while Cholesky fails
    select       full-match regex over layer names; None: every selected kind
    types        layer kinds to prune (linear-family layers only: their inputs give the Hessian)
    """

    sparsity: float = 0.5
    granularity: str = "element"
    importance: Any = "sparsegpt"
    blocksize: int = BLOCKSIZE
    percdamp: float = 0.01
    select: str | None = None
    types: tuple[Any, ...] = ("linear", "addmm")

    preserves: ClassVar[tuple[type, ...]] = (ShapeInfo,)
    constraints: ClassVar[dict] = {
        "sparsity": (Interval(float, 0.0, 1.0),),
        "granularity": (Options("element"), NMPattern()),
        "importance": (Options(*SPARSEGPT_IMPORTANCES), Callables()),
        "blocksize": (Interval(int, 1, 1 << 16),),
        "percdamp": (Interval(float, 0.0, 10.0, lo_open=True),),
        "select": (Regex(), None),
        "types": TYPES_FIELD,
    }

    def __post_init__(self) -> None:
        validate(self)
        object.__setattr__(self, "types", kind_names(self.types))
        nm = nm_pattern(self.granularity)
        if nm and self.sparsity != 0.5 and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"SparseGPT.sparsity={self.sparsity!r} does not apply: the {self.granularity} "
                              f"pattern prunes {1 - nm[0] / nm[1]:g} of every group")
        if nm and self.blocksize % nm[1]:
            raise ConfigError(f"SparseGPT.blocksize={self.blocksize} must be a multiple of M={nm[1]} "
                              f"(an N:M group may not straddle two blocks)")

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        if ctx.calibration_data is None:
            raise PreconditionError("SparseGPT needs calibration data: pass compile(..., calibration_data=batches)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = select_layers(gm, "SparseGPT", self.types, self.select, required=True, warn_tied=True)
        for layer in layers:  # the update rewrites the float weights the layers compute with
            check_float_weight(gm, layer, "SparseGPT")
        created = {layer.name: get_mask(gm, layer) is None for layer in layers}

        def handle(group, stats) -> dict[str, Any]:
            return {layer.name: reconstruct_layer(gm, layer, stats, sparsity=self.sparsity,
                                                  granularity=self.granularity, importance=self.importance,
                                                  blocksize=self.blocksize, percdamp=self.percdamp)
                    for layer in ctx.each(group.layers, "SparseGPT")}

        report = walk(gm, layers, ctx.calibration_data, handle, owner="SparseGPT")
        total = sum(stored_weight(gm, layer).numel() for layer in layers)
        zeros = sum(stored_weight(gm, layer).numel() * report.layers[layer.name]["sparsity"] for layer in layers)
        return PassResult(changed=True, params_touched=tuple(layer.weight for layer in layers),
                          stats={"sparsity": round(zeros / max(total, 1), 6), "masks_created": sum(created.values()),
                                 "layers": report.layers, "blocks": report.blocks,
                                 "calibration_batches": report.batches,
                                 "calibration_peak_bytes": report.peak_held_bytes, **report.padding_stats()})
