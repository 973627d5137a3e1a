"""LowerToInteger: replace fake-quantized layers by integer-only ones (Jacob et al. 2018).

Runs after InsertFakeQuant with linear or fixed-point weights and calibrated activation
fake-quant on the layers' inputs. Each `ActivationQuant` fed by float values becomes an explicit
boundary into codes; each quantized layer becomes an integer layer that requantizes straight onto
the grid of the next activation fake-quant when only ReLU / max-pool / reshape ops stand in
between (those run on integer codes; an nn.Dropout there, the identity in eval mode, is taken out: the lowered
model is for inference), and dequantizes otherwise (e.g. before a float op or the
model's output). A residual add or a concatenation whose operands all come out of activation fake-quants
(`ActivationConfig(joins=True)` puts them there) runs on codes too, requantizing onto the next grid
or dequantizing the same way; one that ActivationConfig(fuse_adds=True) left to the convolution before it
runs inside that convolution on the native backend (oneDNN's sum post-op), as a float add of the codes'
real values on the reference. Any float op reading an activation grid reads its codes' real values. The
result computes what the fake-quant model computes, up to the rounding of the bias and of the
requantization.

Two backends compute it. "reference" (`lower_integer_reference`, `quant.integer`) is the exact
oracle: centered int32 codes and float64 kernels on integer values. "native" (`lower_integer_native`,
`kernels.native`, the default where this machine has oneDNN's int8 kernels and every layer fits them)
runs uint8 codes, each layer on the fastest of oneDNN's int8 kernel, its float kernel and (linear
layers) our C int8 kernel as measured on the layer's real input (`kernels`, `margin`, `repeats`,
`clock`; `float_select` forces layers onto float); oneDNN and the float kernel round the requantization
in float32, so they agree with the reference to one code per layer; ours is the reference bit for bit. A model native cannot run exactly (asymmetric weight codes outside int8, activation grids
other than uint8, a layer kind or code op without a kernel, int16 saturation on a CPU without VNNI where
oneDNN's int8 is the only kernel allowed: elsewhere such a layer runs the float kernel or ours, never int8)
keeps the reference backend by default, the reasons in the pass's statistics; `backend="native"`
refuses it by layer instead. `lower_integer_graph` reads the fake-quant graph for both.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.config import Interval, Options, Regex, TupleOf, validate
from fxcompress.errors import PreconditionError
from fxcompress.kernels.timing import CLOCKS
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.kernels import native
from fxcompress.kernels.native import LAYER_KERNELS
from fxcompress.quant.integer import dequantize_codes
from fxcompress.rewire import drop_unread

from .lower_integer_native import (boundary, choose_kernels, float_code_edges, fuse_boundaries, fuse_residual_adds,
                                   lay_out_boundaries, native_join_refusal, native_refusal, replace_native,
                                   replace_native_add, replace_native_cat, time_fused_layers)
from .lower_integer_reference import boundary as reference_boundary
from .lower_integer_reference import replace_add, replace_cat, replace_layer
from .lower_integer_graph import (JoinPlan, LayerPlan, Quantized, integer_join, is_activation_quant, join_plan,
                                  plan_layer, quantized_layers, requant_target)


@dataclass(frozen=True, kw_only=True)
class LowerToInteger(Pass):
    """Lower every layer with a linear / fixed-point weight quantizer and an input fake-quant to integers.

    backend       "native" (uint8 codes, oneDNN int8, float or our C int8 kernels), "reference" (exact,
                  float64 kernels on integer values) or None: native where this machine has the kernels and
                  every layer fits them, reference otherwise (stats["native_refused"] says why)
    kernels       native: the kernels a layer may run ("int8": oneDNN's, "float", "c_int8": ours in C, linear
                  layers only, bit for bit the reference, offered where a C compiler builds it); where several
                  can run a layer they are timed on its real input and float stays unless another is
                  `margin` times faster (one: the layer runs it, untimed; none: PreconditionError)
    float_select  native: full-match regex over layer names forced onto the float kernel, untimed
    repeats, margin, clock   native timing: rounds per kernel (medians), the factor int8 must win by,
                  "wall" or "thread" time
    """

    backend: str | None = None
    kernels: tuple[str, ...] = LAYER_KERNELS
    float_select: str | None = None
    repeats: int = 7
    margin: float = 1.05
    clock: str = "wall"

    constraints: ClassVar[dict] = {
        "backend": (Options("native", "reference"), None),
        "kernels": (TupleOf(Options(*LAYER_KERNELS), min_len=1),),
        "float_select": (Regex(), None),
        "repeats": (Interval(int, 1, 1000),),
        "margin": (Interval(float, 1.0, 10.0),),
        "clock": (Options(*CLOCKS),),
    }

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = quantized_layers(gm)  # grids are read before their fake-quant nodes go
        targets = {q.node: requant_target(gm, q.node) for q in layers}
        plans = {q.node: plan_layer(gm, q, targets[q.node]) for q in layers}
        joins = {node: join_plan(gm, node, kind) for node in gm.graph.nodes if (kind := integer_join(gm, node))}
        plans = {node: _without_dropouts(gm, plan) for node, plan in plans.items()}
        joins = {node: _without_dropouts(gm, join) for node, join in joins.items()}
        fed = {t for t in targets.values() if t is not None} | {a.target for a in joins.values() if a.target}
        backend, refused = self._choose_backend(gm, layers, plans, joins, fed)
        chosen, edges = {}, set()
        if backend == "native":
            options = {"kernels": self.kernels, "float_select": self.float_select, "repeats": self.repeats,
                       "margin": self.margin, "clock": self.clock}
            chosen = choose_kernels(gm, layers, plans, ctx.example_inputs, options)
            edges = float_code_edges(gm, layers, chosen, targets, joins)
        boundaries = _lower_activations(gm, fed, backend, edges, {q.node for q in layers} | set(joins))
        lowered = {}
        for q in layers:
            if backend == "native":
                lowered[q.layer.name] = replace_native(gm, q, plans[q.node], chosen[q.node], edges)
            else:
                replace_layer(gm, q, plans[q.node])
        for node, join in joins.items():
            _replace_join(gm, node, join, backend)
        residuals = fuse_residual_adds(gm) if backend == "native" else []
        timed = residuals and ctx.example_inputs is not None
        times = time_fused_layers(gm, residuals, ctx.example_inputs, self.repeats) if timed else {}
        summing = {name for name, stats in lowered.items() if stats["module"] in residuals}  # they write codes now
        for name in summing:
            lowered[name].update(output="uint8", residual=True, speedup=None,
                                 times_ms=times[lowered[name]["module"]].as_stats()["times_ms"] if timed else {})
        fused = fuse_boundaries(gm) if backend == "native" else 0
        laid_out = lay_out_boundaries(gm) if backend == "native" else 0
        drop_unread(gm, module_calls_have_effects=False)  # keeps in-place writes (DeepSeek-V3's keys)
        gm.delete_all_unused_submodules()
        for q in layers:
            _drop_float_parameters(gm, q.layer.weight.rpartition(".")[0])
        return PassResult(changed=bool(layers), params_touched=tuple(q.layer.weight for q in layers), stats={
            "backend": backend,
            "native_refused": refused,
            "integer_layers": len(layers),
            "integer_adds": sum(join.kind == "add" for join in joins.values()),
            "integer_cats": sum(join.kind == "cat" for join in joins.values()),
            "requantized": sum(t is not None for t in targets.values()) + len(summing),
            "dequantized": [q.layer.name for q in layers if targets[q.node] is None and q.layer.name not in summing],
            "float_to_integer_boundaries": boundaries,
            "residual_adds_fused": len(residuals),  # taken into the convolution before them (oneDNN's sum)
            "boundaries_fused": fused,  # of those, quantized inside the c_int8 layer reading them
            "boundaries_channels_last": laid_out,  # of those, writing the layout the convolutions reading them read
            "layers": lowered,
            "kernels": {k: sum(s["kernel"] == k for s in lowered.values()) for k in LAYER_KERNELS} if lowered else {},
            "float_code_edges": len(edges),
        })

    def _choose_backend(self, gm: GraphModule, layers: list[Quantized], plans: dict[Node, LayerPlan],
                        joins: dict[Node, JoinPlan], fed: set[Node]) -> tuple[str, dict[str, str]]:
        """The backend to build, and why native was not possible (by layer, join or fake-quant path)."""
        if self.backend == "reference":
            return "reference", {}
        refused: dict[str, str] = {}
        if not native.available():
            refused["*"] = "this torch build has no oneDNN int8 kernels (torch.ops.onednn)"
        else:
            for q in layers:
                if (reason := native_refusal(gm, q, plans[q.node], self.kernels)) is not None:
                    refused[q.layer.name] = reason
            for node, join in joins.items():
                if (reason := native_join_refusal(gm, join)) is not None:
                    refused[node.name] = reason
        if not refused:
            return "native", {}
        if self.backend == "native":
            reasons = "; ".join(f"'{name}': {reason}" for name, reason in refused.items())
            raise PreconditionError(f"LowerToInteger(backend='native') cannot run this model on int8 kernels "
                                    f"exactly: {reasons}; backend='reference' runs any grid")
        return "reference", refused


def _without_dropouts(gm: GraphModule, plan: LayerPlan | JoinPlan) -> LayerPlan | JoinPlan:
    """The plan with the nn.Dropout modules of its code chain taken out of the graph. They are the identity in
    eval mode, and the lowered model is for inference; left in, `model.train()` made them scale integer codes
    (a RuntimeError on int32 / uint8 tensors, and a dropped uint8 code is the zero-point's value, not 0)."""
    kept = []
    for node in plan.chain:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Dropout):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:
            kept.append(node)
    return replace(plan, chain=tuple(kept))


def _lower_activations(gm: GraphModule, fed_by_layer: set[Node], backend: str, edges: set[Node],
                       consumers: set[Node]) -> int:
    """Activation fake-quants fed by an integer layer vanish; the others become the float boundary (into
    float32 codes where only float-kernel layers read them). A reader other than an integer layer or join
    (`consumers`) reads the codes' real values, as it read the fake-quant's output."""
    boundaries = 0
    for node in list(gm.graph.nodes):
        if not is_activation_quant(gm, node):
            continue
        grid = gm.get_submodule(node.target).grid()
        others = [u for u in node.users if u not in consumers]
        if node in fed_by_layer:  # the layer before already requantized onto this grid
            codes = node.args[0]
            node.replace_all_uses_with(codes)
            gm.graph.erase_node(node)
        else:
            codes = node
            if backend == "native":
                codes = boundary(gm, node, grid, values=node in edges)
            else:
                gm.add_submodule(node.target, reference_boundary(grid))
            boundaries += 1
        if others:
            _dequantize_for(gm, codes, others, grid, centered=backend != "native")
    return boundaries


def _dequantize_for(gm: GraphModule, codes: Node, readers: list[Node], grid, centered: bool) -> None:
    """`readers` (float ops) read the real values of `codes` on `grid` instead of the codes."""
    zero_point = 0 if centered else int(grid.zero_point)
    with gm.graph.inserting_after(codes):
        values = gm.graph.call_function(dequantize_codes, (codes, float(grid.scale), zero_point))
    for reader in readers:
        reader.replace_input_with(codes, values)


def _replace_join(gm: GraphModule, node: Node, join: JoinPlan, backend: str) -> None:
    if join.kind == "cat":
        (replace_native_cat if backend == "native" else replace_cat)(gm, node, join)
    else:
        (replace_native_add if backend == "native" else replace_add)(gm, node, join)


def _drop_float_parameters(gm: GraphModule, owner: str) -> None:
    """Replace the (no longer called) float layer module by a plain container of its used children.

    The integer module and the input quantizer live under the layer's path, which keeps the float
    module alive; its weight, bias and mask would otherwise stay in the state dict for nothing.
    """
    if not owner or not _has_submodule(gm, owner):
        return  # the root, or a layer whose output nothing read: dead-code elimination removed it already
    referenced = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    if any(t == owner or (t.startswith(owner + ".") and t.count(".") == owner.count(".") + 1
                          and not isinstance(getattr(gm.get_submodule(owner), t.rpartition(".")[2]), nn.Module))
           for t in referenced):
        return  # the module itself, or one of its own tensors, is still used
    container = nn.Module()
    for name, child in gm.get_submodule(owner).named_children():
        container.add_module(name, child)
    parent, _, name = owner.rpartition(".")
    setattr(gm.get_submodule(parent), name, container)


def _has_submodule(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True
