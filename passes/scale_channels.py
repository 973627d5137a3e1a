"""ScaleChannels: AWQ and SmoothQuant as one scale rewrite (Lin et al. 2024, "AWQ: Activation-aware
Weight Quantization"; Xiao et al. 2023, "SmoothQuant").

    gm = fxcompress.compile(model, [ScaleChannels(method="awq", bits=4, group_size=64),
                                    InsertFakeQuant(method="linear", bits=4, group_size=64)],
                            example_inputs=(ids,), calibration_data=batches)

For every group of linear layers reading one value x (q / k / v, gate / up, o_proj, down_proj),
a graph query walks back from x to the op that last scaled its channels: a norm's weight (RMSNorm
written out as pow / mean / rsqrt / mul, LayerNorm) or a linear layer (v_proj -> attention ->
o_proj, up -> silu(gate) * up -> down_proj, OPT's fc1 -> ReLU -> fc2: ReLU(x / s) = ReLU(x) / s for
s > 0). Then x = x' * s per input channel, so

    producer output / s   and   consumer columns * s

compute exactly the same function in float. A linear layer is nn.Linear or Hugging Face's Conv1D
(addmm with an [in, out] weight): its weight is read as [out, in] rows, so the scales, the fold and the
AWQ grids (one per output channel, dim 1 of the stored weight) are the same as for its nn.Linear twin.
What changes is what quantization sees: AWQ scales salient input channels (large |x|) up in the
weights so their rounding error shrinks, SmoothQuant moves activation outliers into the weights so
both can be 8-bit.

* awq: s = mean|x|^alpha (normalized around 1, as the paper and llm-compressor take it: the root
  mean square weighs the rare large values more and chose worse scales on a trained model's MLP,
  worse than plain rounding on gate / up at 4 bits), alpha searched on `grid` values in [0, 1) for the
  smallest output error of the quantized consumers on the calibration data,
  sum tr(dW H dW^T) with H = mean x^T x: exact for a linear layer, and no activations are kept.
  alpha = 0 is plain rounding, so the search never does worse than it on the calibration data.
  Then, with `clip=True` (AutoAWQ's second step, auto_clip), each quantization group of each consumer
  (one output row, `group_size` input channels) is clamped to the ratio of its largest magnitude, among
  1, 1 - 1/clip_grid, ... down to 1 - max_shrink (exclusive), whose quantized group gives the smallest
  output error of that group, dw_g H_gg dw_g^T on the scaled inputs: AutoAWQ's objective (the mean
  squared partial output x_g . dw_g over the tokens), read from the same Hessian, with no activations
  kept. The clamp is symmetric, ratio * max|w|, as AutoAWQ's, and stays in the weight, so the later
  InsertFakeQuant's min-max grid is the one the search chose. Layers whose output reaches attention
  scores (the query / key operands of scaled_dot_product_attention, or a softmax) are not clipped, as
  AutoAWQ skips q / k: their error reaches the output through the softmax of q . k, which a per-layer
  output error does not measure.
  What the search compares is `objective`: by default ("block") the output of the consumers' block, as
  AutoAWQ's and llm-compressor's "module to inspect": the value that the first residual add after them
  adds back (found in the graph: the add of a value computed from every consumer and one computed from
  none; o_proj's output for q / k / v and v -> o, down_proj's for gate / up and up -> down), run from the
  walk's stored states with the consumers set to Q(W s) / s and the rest of the block float (where a lone
  consumer's own output is the block's, o_proj's or down_proj's, that error is its output error
  tr(dW H dW^T) / out, read from its input Hessian without running the batches; and a candidate stops
  running batches once its error reaches the best so far: the same decisions, fewer runs); "layer" is
  the sum above. With clip_objective="block" (the default) a consumer's clip is then kept only where
  that block output is closer to float with it: on a trained Llama's MLP the clip lowers gate's and up's
  own errors and raises the block's, since a clamp's error follows the signal and the float down_proj
  adds it up. duo_scaling=True takes llm-compressor's scales, mean|x|^alpha / w_mean^(1 - alpha).
* smoothquant: s = max|x|^alpha / max|W|^(1 - alpha) per channel (alpha = 0.5 by default), folded
  only into norms (q / k / v, gate / up), as the paper does: o_proj and down_proj are reported skipped.

Statistics come from sequential calibration (`fxcompress.calibration.walk`): each group sees the
inputs that the already-rescaled layers before it produce. Channels reach x through the ops in the
tables below; the channel map from producer to consumer is found by pushing channel ids through
the very ops of the path (views, transposes, attention's value operand), so heads, reshapes and
repeated key / value heads (GQA: one producer channel feeding several consumer channels) are all
read from the graph, with no per-architecture table. A group whose x comes from anything else (a
GELU, a residual add, an embedding) is left as it is and reported with the op that stopped the query,
or with insert_scales=True (awq) scaled by a product of its own before the group (AutoAWQ's
ScaledActivation), a product taken out again where plain rounding wins.
"""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.analyses import ShapeInfo
from fxcompress.calibration import walk
from fxcompress.calibration.sequential import Probe, value_at
from fxcompress.calibration.clip import ClipGrid, clamp, clip_ratios, search_clip
from fxcompress.config import Boolean, Interval, Options, Regex, check_applicable, validate
from fxcompress.errors import PreconditionError, VerificationError
from fxcompress.layers import (KINDS, Layer, check_float_weight, find_layers, input_arg, inverse_scale_name,
                               kind_of_node, layer_node, select_layers, stored_attr, submodule, tied_readers)
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.rewire import swap_input
from fxcompress.quant.quantizers import check_groups, fake_quantize, linear_grid

METHODS = ("awq", "smoothquant")
# nn.Linear and HF's Conv1D (addmm with an [in, out] weight): the scales act on input channels, read
# through each kind's in_dim, so both are producers and consumers alike
LINEAR_KINDS: tuple[str, ...] = tuple(kind.name for kind in KINDS.values() if kind.family == "linear")
_METHOD_FIELDS = {"grid": ("awq",), "bits": ("awq",), "group_size": ("awq",), "symmetric": ("awq",),
                  "insert_scales": ("awq",), "clip": ("awq",), "clip_grid": ("awq",), "max_shrink": ("awq",),
                  "objective": ("awq",), "duo_scaling": ("awq",), "clip_objective": ("awq",)}
OBJECTIVES = ("layer", "block")

# ---- op tables: how channel ids travel from a producer's output to a consumer's input ----------------
# "same": the value's channels pass unchanged (dtype casts, copies, dropout in eval);
# "shape": the op only moves values (ids are moved by calling the op itself on them).
CHANNEL_METHODS: dict[str, str] = {"to": "same", "contiguous": "same", "float": "same", "clone": "same",
                                   "view": "shape", "reshape": "shape", "transpose": "shape", "permute": "shape",
                                   "flatten": "shape", "unflatten": "shape", "expand": "shape",
                                   "unsqueeze": "shape", "squeeze": "shape"}
CHANNEL_FUNCTIONS: dict[Callable, str] = {torch.clone: "same", F.dropout: "same", torch.reshape: "shape",
                                          torch.transpose: "shape", torch.permute: "shape", torch.flatten: "shape",
                                          torch.unflatten: "shape", operator.getitem: "shape",
                                          torch.unsqueeze: "shape", torch.squeeze: "shape"}
# methods that read only a value's shape, never its values
SHAPE_READERS: frozenset[str] = frozenset({"size", "dim"})
# ops that cut a value into pieces (a tuple, read by getitem): a fused projection's q / k / v. Walking back from
# one piece reaches the fused layer; only the piece's channels are scaled, and no other piece may carry them
SPLITS: frozenset[Any] = frozenset({torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split",
                                    "split_with_sizes"})
# ops whose result is fixed by their output shape alone: ids move by reshaping to it, whatever computed the shape
RESHAPES: frozenset[Any] = frozenset({"view", "reshape", "flatten", "unflatten", torch.reshape, torch.flatten,
                                      torch.unflatten})
# positively homogeneous activations: f(x / s) = f(x) / s for every s > 0, so a channel's scale passes them to the
# layer before (AutoAWQ scales OPT's fc2 into fc1 through its ReLU); GELU, SiLU and tanh are not, and stop the query
HOMOGENEOUS_FUNCTIONS: frozenset[Any] = frozenset({torch.relu, torch.relu_, F.relu, F.relu_, F.leaky_relu})
HOMOGENEOUS_METHODS: frozenset[str] = frozenset({"relu", "relu_"})
HOMOGENEOUS_MODULES: tuple[type, ...] = (nn.ReLU, nn.LeakyReLU)
# ops that mix tokens, not channels, of one operand: (position of that operand); its channels pass
VALUE_OPERANDS: dict[Callable, int] = {F.scaled_dot_product_attention: 2, torch.matmul: 1, operator.matmul: 1,
                                       torch.bmm: 1}
# element-wise products: scaling one factor scales the product by the same amount
PRODUCTS: tuple[Callable, ...] = (operator.mul, torch.mul)
# attention scores: a layer whose output reaches one of these before any other layer is a query / key
# projection (its error passes a softmax): AWQ's clip leaves it alone. (function: its score operands)
SCORE_OPERANDS: dict[Callable, tuple[int, ...]] = {F.scaled_dot_product_attention: (0, 1)}
SOFTMAXES: tuple[Any, ...] = (torch.softmax, F.softmax, "softmax", nn.Softmax)
# residual adds: the first of these that adds a value computed from every consumer of x to one computed
# from none of them closes the consumers' block; that value is AWQ's "module to inspect" output
ADDS: tuple[Any, ...] = (operator.add, torch.add, "add")
# norm modules whose affine weight (and bias) scale their output channels
NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.RMSNorm)
NORM_FUNCTIONS: dict[Callable, tuple[int, int | None]] = {F.layer_norm: (2, 3), F.rms_norm: (2, None)}


@dataclass(frozen=True)
class Producer:
    """What last scaled x's channels: parameters whose output rows / entries are divided by s."""

    name: str                      # a layer name or a parameter name, for reports
    tensors: tuple[str, ...]       # qualified names of the tensors to divide (weight, bias)
    dims: tuple[int, ...]          # the dim of each that indexes the producer's output channels
    channels: int                  # how many output channels
    output: Node                   # the node whose last dim carries those channels
    layer: bool = False            # a linear layer (else a norm's weight)
    path: tuple[Node, ...] = ()    # the nodes find_producer walked, from `output` to x: what map_channels follows


@dataclass(frozen=True, kw_only=True)
class ScaleChannels(Pass):
    """Fold per-input-channel scales into each linear group's producer and the group's columns.

    method      "awq" (alpha searched for the smallest quantized output error) or "smoothquant"
    alpha       fixed migration strength in [0, 1]; None: searched (awq) or 0.5 (smoothquant)
    grid        awq: how many alphas, evenly spaced in [0, 1), to try
    bits        awq: bits of the linear weight grid the search quantizes with
    group_size  awq: input channels per grid (None: one grid per output channel)
    symmetric   awq: a symmetric grid
    clip        awq: after the scales, clamp each weight group to the ratio of its max |w| with the
                smallest quantized output error of the group (AutoAWQ's auto_clip); q / k are left alone.
                True: every consumer; a regex: only the consumers whose names it full-matches; False: none
    clip_grid   awq with clip: ratios are 1 - i / clip_grid
    max_shrink  awq with clip: for i / clip_grid < max_shrink (AutoAWQ: 20 and 0.5, ratios 1 to 0.55)
    objective   awq: what the alpha search compares. "block": the output of the consumers' block (the
                value it adds back to the residual stream, found in the graph: AutoAWQ's and llm-compressor's
                "module to inspect"), with every consumer quantized and the rest of the block float, run
                on the calibration batches; "layer": the sum of the consumers' own output errors,
                tr(dW H dW^T). A group with no such residual add falls back to "layer" (reported)
    duo_scaling awq: scales mean|x|^alpha / w_mean^(1 - alpha), w_mean the mean over output rows of
                |w| / max|w| of its quantization group (llm-compressor's default); False: mean|x|^alpha.
                No scale at all (plain rounding) is a candidate either way
    clip_objective  awq with clip: "layer": every clip the per-group search chose is kept (AutoAWQ);
                "block": a consumer's clip is kept only where the block output, every consumer
                quantized, is closer to float with it than without it (reported)
    insert_scales  awq: where no producer can take a group's scales (a GELU, SiLU or tanh between the
                layers, a residual add, the model's input), multiply the group's input by 1 / s in a node
                of its own (AutoAWQ's ScaledActivation): one element-wise product per such group at run
                time, its buffer `<weight>_inverse_scale` beside the first layer's weight. Removed again
                where the search keeps plain rounding. A compressed-tensors export refuses it
                (transformers' modeling code has no place for it); our own files and GraphModules carry it
    select      full-match regex over the consumer layers' names; None: every linear layer
    """

    method: str = "awq"
    alpha: float | None = None
    grid: int = 20
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    clip: bool | str = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    objective: str = "block"
    duo_scaling: bool = False
    clip_objective: str = "block"
    insert_scales: bool = False
    select: str | None = None

    # weights change; the graph gains only the products insert_scales adds, whose shapes are their inputs'
    preserves: ClassVar[tuple[type, ...]] = (ShapeInfo,)
    constraints: ClassVar[dict] = {
        "method": (Options(*METHODS),), "alpha": (Interval(float, 0.0, 1.0), None),
        "grid": (Interval(int, 1, 1000),), "bits": (Interval(int, 2, 16),),
        "group_size": (Interval(int, 1), None), "symmetric": (Boolean(),), "clip": (Boolean(), Regex()),
        "clip_grid": (Interval(int, 1, 1000),), "max_shrink": (Interval(float, 0.0, 1.0, hi_open=True),),
        "objective": (Options(*OBJECTIVES),), "duo_scaling": (Boolean(),), "clip_objective": (Options(*OBJECTIVES),),
        "insert_scales": (Boolean(),), "select": (Regex(), None),
    }

    def __post_init__(self) -> None:
        validate(self)
        check_applicable("ScaleChannels", self, _METHOD_FIELDS, {self.method}, "method")

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        if ctx.calibration_data is None:
            raise PreconditionError(f"ScaleChannels(method={self.method!r}) needs calibration data: pass "
                                    "compile(..., calibration_data=batches)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = select_layers(gm, "ScaleChannels", LINEAR_KINDS, self.select, required=True)
        for layer in layers:
            check_float_weight(gm, layer, "ScaleChannels")
            if self.method == "awq" and self.group_size is not None:
                check_groups(_rows(gm, layer), 0, self.group_size, f"ScaleChannels.group_size: layer {layer.name!r}")
        shapes = ctx.get(ShapeInfo)
        inserted = insert_scales(gm, layers, shapes) if self.insert_scales else {}
        if inserted:   # the products have their inputs' shapes: described here, as compile would
            shapes = replace(shapes, meta={**shapes.meta, **{n.name: shapes.meta[n.args[0].name]
                                                             for n in inserted.values()}})
            ctx.analyses.put(shapes)
        touched: list[str] = []
        by_input: dict[str, dict[str, Any]] = {}   # the walk may split layers reading one value into groups

        def handle(group, stats, probe: Probe) -> dict[str, Any]:
            if group.input.name not in by_input:
                consumers = tuple(l for l in layers if input_arg(layer_node(gm, l)) is group.input)
                by_input[group.input.name] = self._group(gm, consumers, group.input, stats,
                                                         _Walking(shapes, touched, probe,
                                                                  ctx.example_inputs))
            return {layer.name: by_input[group.input.name][layer.name] for layer in group.layers}

        walked = walk(gm, layers, ctx.calibration_data, handle, owner="ScaleChannels", hessian=self.method == "awq",
                      probe=True)
        kept = remove_unit_scales(gm, inserted)
        scaled = {n: r for n, r in walked.layers.items() if "skipped" not in r}
        clipped = [n for n, r in walked.layers.items() if r.get("clip", {}).get("groups_clipped", 0)]
        return PassResult(changed=bool(scaled or clipped), params_touched=tuple(dict.fromkeys(touched)),
                          stats={"layers_scaled": len(scaled), "layers_skipped": len(walked.layers) - len(scaled),
                                 **({"scales_inserted": kept} if self.insert_scales else {}),
                                 **({"layers_clipped": len(clipped)} if self._clips else {}),
                                 "layers": walked.layers, "calibration_batches": walked.batches,
                                 "calibration_peak_bytes": walked.peak_held_bytes})

    @property
    def _clips(self) -> bool:
        return self.method == "awq" and self.clip is not False

    def _clipped(self, layer: Layer) -> bool:
        return self._clips and (self.clip is True or re.fullmatch(self.clip, layer.name) is not None)

    def _group(self, gm: GraphModule, consumers: tuple[Layer, ...], x: Node, stats,
               walking: _Walking) -> dict[str, dict[str, Any]]:
        """Scale, then (awq) clip the consumers of x; each consumer's report."""
        inspected, why = self._inspect(gm, consumers, stats, walking.probe)
        report, scale = self._scale(gm, consumers, x, stats, walking, inspected)
        if scale is not None:
            # the fold divided x's producer, but the walk stored x as it was: without this the consumers
            # (and every later group of the block, and the next blocks) would see x * s on the scaled weights
            walking.probe.replace(x, lambda value: value / scale.to(value.dtype))
            if inspected is not None:
                inspected = inspected.rescaled(scale)
        if why or inspected is not None:   # the block output read, or why none was
            report["inspected"] = why or inspected.node.name
        reports = {layer.name: dict(report) for layer in consumers}
        folded: dict[str, torch.Tensor] = {}
        for layer in filter(self._clipped, consumers):
            folded[layer.name] = _rows(gm, layer).clone()
            reports[layer.name]["clip"] = self._clip(gm, layer, stats.hessian, scale, walking.touched)
        if folded and self.clip_objective == "block" and inspected is not None:
            self._check_clips(gm, consumers, folded, reports, inspected)
        return reports

    def _inspect(self, gm: GraphModule, consumers: tuple[Layer, ...], stats,
                 probe: Probe) -> tuple[Inspected | OwnOutput | None, str]:
        """The consumers' block output and its float value on the calibration batches, where a block
        objective asks for it; else None, and why where one was asked for and the graph has none. Where
        the block output is a lone consumer's own output (o_proj, down_proj), its error is read from the
        input Hessian instead of running the batches (OwnOutput: the same value up to float rounding)."""
        wanted = self.objective == "block" or (self._clips and self.clip_objective == "block")
        if self.method != "awq" or not wanted:
            return None, ""
        nodes = [layer_node(gm, layer) for layer in consumers]
        node = block_output(gm, nodes)
        if node is None:
            return None, (f"no residual add after {', '.join(layer.name for layer in consumers)}: "
                          "the search and the clip read the layers' own output errors")
        if nodes == [node]:
            return OwnOutput(node, _rows(gm, consumers[0]).to(torch.float64, copy=True), stats.hessian), ""
        return Inspected(node, list(probe.tokens(node)), probe), ""

    def _check_clips(self, gm: GraphModule, consumers: tuple[Layer, ...], folded: dict[str, torch.Tensor],
                     reports: dict[str, dict[str, Any]], inspected: Inspected) -> None:
        """Keep each consumer's clip only where the block output, every consumer quantized, is closer to
        float with it: a clamp's error follows the signal, and a float layer after it (down_proj after
        gate / up) can add it up where rounding errors average out."""
        weights = [_rows(gm, layer) for layer in consumers]
        current = None   # the block error with the weights as they stand: each decision leaves one it measured
        for i, layer in enumerate(consumers):
            clip = reports[layer.name].get("clip", {})
            if not clip.get("groups_clipped"):
                continue
            quantized = [self.quantized(w) for w in weights]
            clipped = inspected.error(weights, quantized) if current is None else current
            quantized[i] = self.quantized(folded[layer.name])
            whole = inspected.error(weights, quantized)
            clip.update(block_error_clipped=clipped, block_error_unclipped=whole, kept=clipped < whole)
            current = clipped if clipped < whole else whole
            if not clipped < whole:
                with torch.no_grad():
                    weights[i].copy_(folded[layer.name])

    def _scale(self, gm: GraphModule, consumers: tuple[Layer, ...], x: Node, stats, walking: _Walking,
               inspected: Inspected | OwnOutput | None) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Find the producer of x for all its consumers, then fold: the report (or why it was skipped)
        and the scale of each consumer input channel (None when skipped)."""
        producer, why = find_producer(gm, x, {layer_node(gm, layer) for layer in consumers})
        if producer is None:
            return {"skipped": why}, None
        if self.method == "smoothquant" and producer.layer:
            # the paper and llm-compressor smooth only norm -> linear; on a trained 6.9 M Llama, scales
            # folded from up_proj into down_proj reached 100x and 8-bit weights lost (perplexity 6.76 -> 8.53)
            return {"skipped": f"{producer.name} is a linear layer: SmoothQuant folds only into norms"}, None
        channel_map, why = map_channels(gm, producer, x, walking.shapes)
        if channel_map is None:
            return {"skipped": why}, None
        walking.touched.extend([*producer.tensors, *(layer.weight for layer in consumers)])
        before = value_at(gm, walking.example, x)   # only where a fold follows: a forward pass as far as x
        report, scale = self._rescale(gm, consumers, producer, channel_map, stats, inspected)
        _check_fold(x, before, value_at(gm, walking.example, x), scale, producer.name)
        return report, scale

    def _rescale(self, gm: GraphModule, layers: tuple[Layer, ...], producer: Producer, channel_map: torch.Tensor,
                 stats, inspected: Inspected | OwnOutput | None) -> tuple[dict[str, Any], torch.Tensor]:
        weights = [_rows(gm, layer) for layer in layers]
        if self.method == "smoothquant":
            alpha = 0.5 if self.alpha is None else self.alpha
            scale = smoothquant_scales(stats.abs_max, weights, channel_map, producer.channels, alpha)
            report: dict[str, Any] = {"alpha": alpha}
        else:
            mean_abs = stats.abs_sum / max(stats.rows, 1)
            alphas = [self.alpha] if self.alpha is not None else [i / self.grid for i in range(self.grid)]
            error, objective = self._objective(weights, stats.hessian, inspected)
            scale, report = self._search(weights, error, mean_abs, channel_map, producer.channels, alphas)
            report = {"objective": objective, **report}
        scale = _unread_unscaled(scale, channel_map)
        fold(gm, producer, layers, scale, channel_map)
        return {"producer": producer.name, **report, "scale_min": round(float(scale.min()), 6),
                "scale_max": round(float(scale.max()), 6)}, scale[channel_map]

    def _objective(self, weights: list[torch.Tensor], hessian: torch.Tensor, inspected: Inspected | OwnOutput | None
                   ) -> tuple[Callable[[torch.Tensor, float], float], str]:
        """What the search minimizes for a scale of each consumer input channel: the block output's
        mean squared error (objective="block", where the graph has a block output) or the consumers'
        summed own output errors. The second argument is a bound: an error that reaches it is not
        needed exactly (the block output stops running batches there, see Inspected.error)."""
        if self.objective == "block" and inspected is not None:
            return lambda scale, bound=math.inf: inspected.error(
                weights, [self.quantized(w, scale) for w in weights], bound), "block"
        return lambda scale, bound=math.inf: sum(self.output_error(w, scale, hessian) for w in weights), "layer"

    def _search(self, weights: list[torch.Tensor], error: Callable[[torch.Tensor, float], float],
                mean_abs: torch.Tensor, channel_map: torch.Tensor, channels: int,
                alphas: list[float]) -> tuple[torch.Tensor, dict]:
        """AWQ's grid search: the alpha whose scales give the smallest quantized output error (or no
        scale, where none beats plain rounding). A candidate must be strictly below the best so far to
        win, so its error is needed only below that bound: above it, it may stop early."""
        magnitude = _fill_unused(_per_producer(mean_abs, channel_map, channels), channel_map)
        magnitude = magnitude.clamp(min=float(magnitude.max()) * 1e-4)   # never divide by a dead channel's 0
        w_mean = None
        if self.duo_scaling:
            w_mean = _fill_unused(_per_producer(weight_means(weights, self.group_size), channel_map, channels),
                                  channel_map)
        ones = torch.ones(channels, dtype=torch.float64)
        plain = error(ones[channel_map])
        best = (math.inf, 0.0, ones)
        for alpha in alphas:
            scale = awq_scales(magnitude, alpha, w_mean)
            # alpha = 0 without duo scaling gives scales of exactly 1: plain rounding, measured above
            candidate = plain if torch.equal(scale, ones) else error(scale[channel_map], best[0])
            if candidate < best[0]:
                best = (candidate, alpha, scale)
        if self.alpha is None and plain < best[0]:   # searched: with duo scaling, alpha = 0 is not plain rounding
            best = (plain, None, ones)
        value, alpha, scale = best
        return scale, {"alpha": alpha, "error_plain": float(plain), "error": float(value),
                       "error_ratio": round(float(value / plain), 6) if plain > 0 else 1.0}

    def _clip(self, gm: GraphModule, layer: Layer, hessian: torch.Tensor, scale: torch.Tensor | None,
              touched: list[str]) -> dict[str, Any]:
        """AWQ's clip of one consumer (its columns already scaled): the search on the Hessian of the
        scaled inputs x / s, the clamp written into the weight, and the report."""
        scores = reaches_scores(gm, layer_node(gm, layer))
        if scores is not None:
            return {"skipped": f"{layer.name}'s output reaches attention scores at {scores.name} ({_op_name(scores)}): "
                               "its error passes a softmax, as q / k do, which AWQ's clip leaves alone"}
        weight = _rows(gm, layer)
        if scale is not None:
            hessian = hessian / torch.outer(scale, scale)
        bound, report = search_clip(weight, hessian, self.clip_ratios(),
                                    ClipGrid(self.bits, self.symmetric, self.group_size))
        if report["groups_clipped"]:
            with torch.no_grad():   # a group left whole has bound max|w|: the clamp keeps it bit for bit
                weight.copy_(clamp(weight.reshape(weight.shape[0], bound.shape[1], -1), bound).reshape(weight.shape))
            touched.append(layer.weight)
        return report

    def clip_ratios(self) -> list[float]:
        """AutoAWQ's clip grid: 1, 1 - 1/clip_grid, ... while the shrink is below max_shrink."""
        return clip_ratios(self.clip_grid, self.max_shrink)

    def output_error(self, weight: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> float:
        """sum over output rows of dW H dW^T: the mean squared output error over the calibration tokens
        of the layer quantized after its columns were multiplied by `scale` (and its input divided)."""
        delta = self.quantized(weight, scale) - weight.double()
        return float(((delta @ hessian) * delta).sum())

    def quantized(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Q(W * s) / s in float64: the [out, in] rows as the later InsertFakeQuant will see them once
        the scales are folded, divided back so that they read the unscaled input."""
        scaled = weight.double() * (1.0 if scale is None else scale)
        grid = linear_grid(scaled, self.bits, self.symmetric, axis=0, group_size=self.group_size)
        return fake_quantize(scaled, grid, axis=0) / (1.0 if scale is None else scale)


def awq_scales(magnitude: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """magnitude^alpha (over w_mean^(1 - alpha) with duo scaling, llm-compressor's form, its 1e-4 guards),
    normalized so that the largest and smallest scale straddle 1 evenly."""
    scale = magnitude.double().pow(alpha)
    if w_mean is not None:
        scale = (scale / (w_mean.double().pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return scale / (scale.max() * scale.min()).sqrt()


def weight_means(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel, the mean over all consumers' output rows of |w| / max|w| of its quantization
    group: how large a channel's weights are where the grid is set (duo scaling's w_mean)."""
    rows = torch.cat([w.detach().double().abs() for w in weights])
    groups = rows.reshape(rows.shape[0], -1, group_size or rows.shape[1])
    return (groups / (groups.amax(-1, keepdim=True) + 1e-6)).reshape(rows.shape).mean(0)


def _check_fold(x: Node, before: torch.Tensor, after: torch.Tensor, scale: torch.Tensor, producer: str) -> None:
    """The fold must leave x divided by the scales on the example inputs, as the consumers' columns assume: a
    graph query that took the wrong channels would change the model silently."""
    expected = before.double() / scale.double()
    # a float16 / bfloat16 producer rounds its divided weights and the value it computes: a few of its ulps off
    # (a wrong channel is off by the scale itself, far more)
    tol = max(1e-4, 8 * torch.finfo(after.dtype).eps) if after.is_floating_point() else 1e-4
    if not torch.allclose(after.double(), expected, rtol=tol, atol=tol / 10 * float(expected.abs().max())):
        worst = float((after.double() - expected).abs().max())
        raise VerificationError(f"ScaleChannels: the scales folded into {producer} did not divide {x.name} by them "
                                f"on the example inputs (off by up to {worst:.3g}): the fold would change the model")


def _read(channel_map: torch.Tensor, channels: int) -> torch.Tensor:
    """Per producer channel, whether a consumer reads it."""
    return torch.bincount(channel_map, minlength=channels) > 0


def _unread_unscaled(scale: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
    """Scale 1 on the producer channels the consumers do not read: other ops may read them (a fused q / k / v
    layer's q and k pieces when v -> o is scaled), and the consumers' error never depended on them."""
    return torch.where(_read(channel_map, scale.numel()), scale, torch.ones_like(scale))


def _fill_unused(values: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
    """A producer channel no consumer reads takes the mean of the others (only the read ones are folded)."""
    used = _read(channel_map, values.numel())
    values[~used] = values[used].mean()
    return values


def smoothquant_scales(abs_max: torch.Tensor, weights: list[torch.Tensor], channel_map: torch.Tensor,
                       channels: int, alpha: float) -> torch.Tensor:
    """max|x|^alpha / max|W|^(1-alpha) per producer channel (1 where a channel is never active)."""
    x_max = _per_producer(abs_max.double(), channel_map, channels)
    w_cols = torch.stack([w.detach().abs().amax(dim=0).double() for w in weights]).amax(dim=0)
    w_max = _per_producer(w_cols, channel_map, channels)
    scale = x_max.pow(alpha) / w_max.clamp(min=1e-8).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), scale.clamp(min=1e-5), torch.ones_like(scale))


@dataclass(frozen=True)
class Inspected:
    """The consumers' block output (AWQ's module to inspect) and its float value on each calibration batch
    (its rows at unpadded positions: `Probe.tokens`, so padding weighs in no candidate's error)."""

    node: Node
    reference: list[torch.Tensor]
    probe: Probe

    def rescaled(self, scale: torch.Tensor) -> Inspected:
        """After a fold: the probe's stored input already reads x / scale, the reference is unchanged."""
        return self

    def error(self, weights: list[torch.Tensor], candidates: list[torch.Tensor], bound: float = math.inf) -> float:
        """The block output's mean squared difference from float with `weights` set to `candidates`
        (each restored after).

        The batches' squared errors are added in order, each >= 0, so the running mean only grows (IEEE
        sums and quotients round monotonically): once it reaches `bound`, the whole error would too, and
        that running value is returned without running the other batches. A caller that keeps a
        candidate only when its error is strictly below `bound` decides exactly as with every batch run."""
        count = max(sum(r.numel() for r in self.reference), 1)
        saved = [w.clone() for w in weights]
        total = 0.0
        try:
            with torch.no_grad():
                for weight, candidate in zip(weights, candidates):
                    weight.copy_(candidate.to(weight.dtype))
            for output, reference in zip(self.probe.tokens(self.node), self.reference):
                # (o - r)^2 in float64, in place on a float64 copy of o (r widened exactly, as by r.double())
                total += float(output.to(torch.float64, copy=True).sub_(reference).square_().sum())
                if total / count >= bound:
                    break
        finally:
            with torch.no_grad():
                for weight, kept in zip(weights, saved):
                    weight.copy_(kept)
        return total / count


@dataclass(frozen=True)
class OwnOutput:
    """A lone consumer whose own output is its block's output (o_proj, down_proj): the block output's mean
    squared error over the calibration tokens is its output error, mean_t |dW x_t|^2 / out = tr(dW H dW^T) / out
    with H = mean x^T x, read from the Hessian the walk took of its input instead of running the batches
    (Inspected's value up to float rounding: float64 here, float32 outputs subtracted there).

    `weight` and `hessian` are as inspected, before the fold; after it (`rescaled`) the layer reads x / scale,
    so a candidate's rows are divided by the scale to compare them with the float weight on x."""

    node: Node
    weight: torch.Tensor                 # [out, in] float64
    hessian: torch.Tensor                # [in, in] float64, mean x^T x
    scale: torch.Tensor | None = None    # per input channel, once folded

    def rescaled(self, scale: torch.Tensor) -> OwnOutput:
        return replace(self, scale=scale)

    def error(self, weights: list[torch.Tensor], candidates: list[torch.Tensor], bound: float = math.inf) -> float:
        """The output's mean squared difference from float with the weight set to the candidate (as
        Inspected sets it: cast to the weight's dtype); `bound` is not needed here."""
        (weight,), (candidate,) = weights, candidates
        rows = candidate.to(weight.dtype).double()
        delta = (rows if self.scale is None else rows / self.scale) - self.weight
        return float(((delta @ self.hessian) * delta).sum()) / max(delta.shape[0], 1)


@dataclass(frozen=True)
class _Walking:
    """What a group's handler reads besides the group: shapes, the tensors touched so far, the walk's states."""

    shapes: ShapeInfo
    touched: list[str]
    probe: Probe
    example: tuple                 # compile's example inputs: each fold is checked on them


def _per_producer(values: torch.Tensor, channel_map: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-consumer-channel statistic as one value per producer channel (the largest of those it feeds)."""
    out = torch.zeros(channels, dtype=values.dtype)
    return out.scatter_reduce(0, channel_map, values, reduce="amax", include_self=False)


def fold(gm: GraphModule, producer: Producer, layers: tuple[Layer, ...], scale: torch.Tensor,
         channel_map: torch.Tensor) -> None:
    """Divide the producer's output channels by `scale`, multiply the consumers' columns by it."""
    with torch.no_grad():
        for name, dim in zip(producer.tensors, producer.dims):
            tensor = operator.attrgetter(name)(gm)
            shape = [1] * tensor.dim()
            shape[dim] = -1
            tensor.div_(scale.to(tensor.dtype).reshape(shape))
        for layer in layers:
            weight = _rows(gm, layer)
            weight.mul_(scale[channel_map].to(weight.dtype).reshape(1, -1))


def insert_scales(gm: GraphModule, layers: list[Layer], shapes: ShapeInfo) -> dict[str, Node]:
    """For each group of layers reading one value x whose scales no producer can take, x * b before them,
    b a buffer of ones beside the first layer's weight: the product is the group's producer (a 1-D factor, as a
    norm's weight), so the search and the fold treat it as any other. The products, by buffer name."""
    groups: dict[Node, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(input_arg(layer_node(gm, layer)), []).append(layer)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    inserted = {}
    for x, group in groups.items():
        nodes = sorted((layer_node(gm, layer) for layer in group), key=order.get)
        shape = shapes.shape(x.name)
        if find_producer(gm, x, set(nodes))[0] is not None or not shape:
            continue
        name = inverse_scale_name(group[0].weight)
        owner, _, attr = name.rpartition(".")
        submodule(gm, owner).register_buffer(attr, torch.ones(shape[-1], dtype=shapes.meta[x.name].dtype))
        with gm.graph.inserting_before(nodes[0]):
            product = gm.graph.call_function(operator.mul, (x, gm.graph.get_attr(name)))
        product.meta.update({k: v for k, v in x.meta.items() if k == "tensor_meta"})
        for node in nodes:
            node.replace_input_with(x, product)
        inserted[name] = product
    if inserted:
        gm.recompile()
    return inserted


def remove_unit_scales(gm: GraphModule, inserted: dict[str, Node]) -> list[str]:
    """Take out the products whose buffer is still all ones (the group was skipped, or plain rounding won);
    the buffer names of the rest."""
    kept = []
    for name, product in inserted.items():
        if not bool((stored_attr(gm, name) == 1).all()):
            kept.append(name)
            continue
        for user in list(product.users):
            swap_input(gm, user, product, product.args[0])
    if len(kept) < len(inserted):
        gm.recompile()
    return kept


def _weight(gm: GraphModule, layer: Layer) -> torch.Tensor:
    weight = operator.attrgetter(layer.weight)(gm)
    return weight.data if isinstance(weight, nn.Parameter) else weight


def _rows(gm: GraphModule, layer: Layer) -> torch.Tensor:
    """The weight as [out, in] rows: a view, so scaling its columns scales the stored tensor (an addmm
    weight is stored [in, out]: its input channels are rows, and its grids run along dim 1, the rows here)."""
    weight = _weight(gm, layer)
    return weight if KINDS[layer.kind].out_dim == 0 else weight.t()


# ---- the graph query -------------------------------------------------------------------------------------

def reaches_scores(gm: GraphModule, start: Node) -> Node | None:
    """The attention op (a score operand of scaled_dot_product_attention, or a softmax) that a layer's
    output reaches before any other layer reads it: the layer is a query or key; None when there is none."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            score = SCORE_OPERANDS.get(user.target, ()) if user.op == "call_function" else ()
            if any(user.args[p] is node for p in score if p < len(user.args)) or _is_softmax(gm, user):
                return user
            if user not in seen and kind_of_node(gm, user) is None:
                seen.add(user)
                stack.append(user)
    return None


def block_output(gm: GraphModule, consumers: list[Node]) -> Node | None:
    """The value the consumers' block adds back to the residual stream: at the first add (in graph order)
    of a value computed from every consumer and one computed from none, the former (o_proj's output for
    q / k / v and for v -> o, down_proj's for gate / up and up -> down); None when there is no such add."""
    reached = [_descendants(node) for node in consumers]
    every, some = set.intersection(*reached), set.union(*reached)
    for node in gm.graph.nodes:
        if node not in every or not _is_add(node):
            continue
        a, b = node.args[:2]
        for mine, other in ((a, b), (b, a)):
            if mine in every and isinstance(other, Node) and other not in some:
                return mine
    return None


def _descendants(node: Node) -> set[Node]:
    seen, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def _is_add(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADDS and len(node.args) >= 2 \
        and not node.kwargs


def _is_softmax(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), tuple(t for t in SOFTMAXES if isinstance(t, type)))
    return node.op in ("call_function", "call_method") and node.target in SOFTMAXES


def find_producer(gm: GraphModule, x: Node, consumers: set[Node]) -> tuple[Producer | None, str]:
    """The producer of x's channels and an empty reason, or None and why there is none.

    Every node between the producer and x must feed only the next one, and x only the consumers:
    otherwise the rescaled value would reach something that is not compensated."""
    others = [u for u in _value_users(x) if u not in consumers]
    if others:
        return None, f"{x.name} also feeds {', '.join(u.name for u in others)}"
    return _walk_back(gm, x, first=True)


def _walk_back(gm: GraphModule, node: Node, first: bool = False, after: tuple[Node, ...] = ()
               ) -> tuple[Producer | None, str]:
    """The producer found walking back from `node` (`after`: the nodes walked so far, from node's user to x)."""
    users = _value_users(node)
    if not first and len(users) != 1:
        return None, f"{node.name} feeds {len(users)} ops"
    walked = (node, *after)
    found = _as_producer(gm, node)
    if found is not None:
        producer, why = found
        return (None if producer is None else replace(producer, path=walked)), why
    if _is_product(node):
        return _through_product(gm, node, walked)
    split = _piece_of(node)
    if split is not None:   # the other pieces read other channels of the input (map_channels checks it)
        return _walk_back(gm, split.args[0], after=(split, *walked))
    step = _channel_step(gm, node)
    if step is None:
        return None, f"{node.name} ({_op_name(node)}) is not an op that keeps channels"
    return _walk_back(gm, step, after=walked)


def _as_producer(gm: GraphModule, node: Node) -> tuple[Producer | None, str] | None:
    """A linear layer or a norm at `node` as a Producer (or the reason it cannot be one); None: neither."""
    kind = kind_of_node(gm, node)
    if kind is not None:
        if kind.name not in LINEAR_KINDS:
            return None, f"{node.name} is a {kind.name} layer"
        layer = next((l for l in find_layers(gm) if l.node == node.name), None)
        if layer is None or layer.tied_to is not None or tied_readers(gm, node):
            return None, f"{node.name}'s weight is shared with another layer"
        check_float_weight(gm, layer, "ScaleChannels")
        tensors = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
        return Producer(layer.name, tensors, (kind.out_dim,) + (0,) * (len(tensors) - 1),
                        _weight(gm, layer).shape[kind.out_dim], node, layer=True), ""
    return _as_norm(gm, node)


def _as_norm(gm: GraphModule, node: Node) -> tuple[Producer | None, str] | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), NORM_MODULES):
        module = gm.get_submodule(node.target)
        if getattr(module, "weight", None) is None or len(module.normalized_shape) != 1:
            return None, f"{node.target} has no per-channel affine weight"
        params = [p for p in ("weight", "bias") if getattr(module, p, None) is not None]
        # dividing the weight changes every use of it: a second call of the module (one LayerNorm applied
        # twice) or another reader of its tensors would see x / s with nothing to compensate it
        others = _other_readers(gm, node, [getattr(module, p) for p in params])
        if others:
            return None, (f"{node.target}'s affine weight is also read by "
                          f"{', '.join(n.name for n in others)}: dividing it would change those uses too")
        names = tuple(f"{node.target}.{p}" for p in params)
        return Producer(node.target, names, (0,) * len(names), module.weight.numel(), node), ""
    if node.op == "call_function" and node.target in NORM_FUNCTIONS:
        positions = NORM_FUNCTIONS[node.target]
        args = [node.args[p] if p is not None and len(node.args) > p else None for p in positions]
        params = [a for a in args if a is not None]
        if not params or not all(_private_param(gm, a) for a in params):
            return None, f"{node.name}'s affine weight is not a parameter of its own"
        return Producer(params[0].target, tuple(a.target for a in params), (0,) * len(params),
                        _param(gm, params[0]).numel(), node), ""
    return None


def _through_product(gm: GraphModule, node: Node, walked: tuple[Node, ...]) -> tuple[Producer | None, str]:
    """x = a * b: a 1-D parameter factor is the producer (a norm's weight); else scaling one computed
    factor (up_proj in silu(gate) * up) scales the product, if the other does not depend on it."""
    a, b = node.args[:2]
    for factor, other in ((a, b), (b, a)):
        if isinstance(factor, Node) and _private_param(gm, factor) and _param(gm, factor).dim() == 1:
            return Producer(factor.target, (factor.target,), (0,), _param(gm, factor).numel(), node, path=walked), ""
    reasons = []
    for factor, other in ((b, a), (a, b)):
        if not isinstance(factor, Node):
            continue
        found, why = _walk_back(gm, factor, after=walked)
        if found is not None and not (isinstance(other, Node) and _depends_on(other, found.output)):
            return found, ""
        reasons.append(why or f"both factors of {node.name} depend on {found.name}")
    return None, "; ".join(reasons) or f"{node.name} multiplies no computed value"


def _channel_step(gm: GraphModule, node: Node) -> Node | None:
    """The input through which `node` passes its channels on, or None when it mixes them."""
    if _homogeneous(gm, node):
        return node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if node.op == "call_method" and node.target in CHANNEL_METHODS:
        return node.args[0] if isinstance(node.args[0], Node) else None
    if node.op == "call_function" and node.target in CHANNEL_FUNCTIONS:
        return node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if node.op == "call_function" and node.target in VALUE_OPERANDS:
        position = VALUE_OPERANDS[node.target]
        value = node.args[position] if len(node.args) > position else node.kwargs.get("value")
        return value if isinstance(value, Node) else None
    return None


def _homogeneous(gm: GraphModule, node: Node) -> bool:
    """A positively homogeneous activation (ReLU, leaky ReLU): a positive per-channel scale passes it."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), HOMOGENEOUS_MODULES)
    return (node.op == "call_function" and node.target in HOMOGENEOUS_FUNCTIONS) or \
        (node.op == "call_method" and node.target in HOMOGENEOUS_METHODS)


def _piece_of(node: Node) -> Node | None:
    """The split that `node` takes a piece of (`getitem(split(x), i)`), where every reader of the split takes a
    piece; None otherwise."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return None
    split = node.args[0]
    if not (isinstance(split, Node) and split.op in ("call_function", "call_method") and split.target in SPLITS
            and isinstance(split.args[0], Node)):
        return None
    pieces = all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                 for u in split.users)
    return split if pieces else None


def _value_users(node: Node) -> list[Node]:
    """The users that read `node`'s values: a scale leaves sizes alone, so `x.size()` (HF's Conv1D
    flattens its input by `x.view(-1, x.size(-1))`) needs no compensation."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in SHAPE_READERS)]


def _is_product(node: Node) -> bool:
    return ((node.op == "call_function" and node.target in PRODUCTS) or
            (node.op == "call_method" and node.target == "mul")) and len(node.args) == 2 and not node.kwargs


def _private_param(gm: GraphModule, node: Node) -> bool:
    """A get_attr of a parameter that no other node reads (so dividing it changes only this use)."""
    if node.op != "get_attr" or len(node.users) != 1:
        return False
    tensor = _param(gm, node)
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and _param(gm, n) is tensor]
    return isinstance(tensor, torch.Tensor) and torch.is_floating_point(tensor) and len(readers) == 1


def _other_readers(gm: GraphModule, node: Node, tensors: list[torch.Tensor]) -> list[Node]:
    """The nodes besides `node` that read any of `tensors`: a call of a module holding one (the same module
    called again, or one sharing the parameter) or a get_attr of one."""
    def reads(other: Node) -> bool:
        if other.op == "call_module":
            module = gm.get_submodule(other.target)
            held = [*module.parameters(), *module.buffers()]
        elif other.op == "get_attr":
            held = [_param(gm, other)]
        else:
            return False
        return any(h is t for h in held for t in tensors)
    return [other for other in gm.graph.nodes if other is not node and reads(other)]


def _param(gm: GraphModule, node: Node) -> Any:
    return operator.attrgetter(node.target)(gm)


def _depends_on(node: Node, ancestor: Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def _op_name(node: Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


# ---- the channel map -------------------------------------------------------------------------------------

def _take_piece(node: Node, pieces: tuple[torch.Tensor, ...], shapes: ShapeInfo) -> torch.Tensor | None:
    """The piece a getitem takes of a split's channel ids, or None where another piece carries any of its channels
    (a split along tokens: scaling them would reach that piece uncompensated)."""
    index = node.args[1]
    piece = pieces[index]
    others = [p.reshape(-1) for i, p in enumerate(pieces) if i != index % len(pieces)]
    if others and bool(torch.isin(piece.reshape(-1), torch.cat(others)).any()):
        return None
    return piece if tuple(piece.shape) == tuple(shapes.shape(node.name) or ()) else None


def map_channels(gm: GraphModule, producer: Producer, x: Node, shapes: ShapeInfo) -> tuple[torch.Tensor | None, str]:
    """For each channel of x (its last dim), the producer channel it carries, found by pushing channel
    ids through the ops find_producer walked; None (and why) when a channel of x mixes producer channels."""
    path = producer.path
    shape = shapes.shape(producer.output.name)
    if shape is None or shape[-1] != producer.channels:
        return None, f"{producer.output.name}'s last dim is not {producer.name}'s {producer.channels} channels"
    ids = torch.arange(producer.channels).expand(shape)
    for prev, node in zip(path, path[1:]):
        ids = _move_ids(gm, node, prev, ids, shapes)
        if ids is None:
            return None, f"channel ids cannot pass {node.name} ({_op_name(node)})"
    rows = ids.reshape(-1, ids.shape[-1])
    if not bool((rows == rows[0]).all()):
        return None, f"{x.name} mixes {producer.name}'s channels across positions"
    return rows[0].clone(), ""


def _move_ids(gm: GraphModule, node: Node, prev: Node, ids: torch.Tensor | tuple, shapes: ShapeInfo
              ) -> torch.Tensor | tuple | None:
    if node.target in SPLITS and node.args[0] is prev:   # the pieces, each checked where a getitem takes it
        args = [ids, *node.args[1:]]
        return getattr(ids, node.target)(*args[1:], **node.kwargs) if node.op == "call_method" else \
            node.target(*args, **node.kwargs)
    if isinstance(ids, tuple):
        return _take_piece(node, ids, shapes)
    out = shapes.shape(node.name)
    if out is None:
        return None
    if _is_product(node) or _homogeneous(gm, node) or CHANNEL_METHODS.get(node.target) == "same" \
            or CHANNEL_FUNCTIONS.get(node.target) == "same":
        return ids.broadcast_to(out) if torch.broadcast_shapes(ids.shape, out) == torch.Size(out) else None
    if node.op == "call_function" and node.target in VALUE_OPERANDS:   # channels kept, tokens mixed
        first = ids.narrow(-2, 0, 1)
        return first.expand(out) if bool((ids == first).all()) and first.shape[:-2] == out[:-2] else None
    if node.target in RESHAPES and node.args[0] is prev and ids.numel() == math.prod(out):
        return ids.reshape(out)   # HF's Conv1D views by sizes read at run time: the recorded shape says where
    if any(a is not prev for a in node.all_input_nodes):
        return None   # a shape computed at run time: read only constant ones
    args = [ids if a is prev else a for a in node.args]
    moved = getattr(ids, node.target)(*args[1:], **node.kwargs) if node.op == "call_method" else \
        node.target(*args, **node.kwargs)
    return moved if tuple(moved.shape) == tuple(out) else None
