"""InsertFakeQuant: trained quantization and weight sharing as fake-quant nodes in the graph
(Han et al. 2016, "Deep Compression", section 3).

    gm = fxcompress.compile(model, [InsertFakeQuant(bits=5, method="kmeans")], example_inputs=(x,))

Every selected linear / conv weight goes through a fake-quant module before the layer uses it,
after the mask's `mul(weight, weight_mask)` when the layer is pruned:

    get_attr fc1.weight -> mul(., fc1.weight_mask) -> fc1.weight_quant -> F.linear(x, ., bias)

* kmeans: `KMeansWeight`, a trainable codebook gathered by fixed codes (fine-tuning moves the
  shared centroids by the summed gradient of their members);
* linear / fixed_point: `GridWeight`, rounding onto an integer grid with the straight-through estimator.

With `activations=ActivationConfig(...)`, each quantized layer's input gets an `ActivationQuant`
node whose observer is calibrated on `compile(..., calibration_data=...)`, then frozen or left to
follow the data in training (QAT). Calibration batches are read as GPTQ's walk reads them: dicts bind
to the graph's inputs by name, and positions an `attention_mask` input marks as padding are left out of
every observer (`fxcompress.quant.calibrate`). `fxcompress.quant.set_quantization(gm, False)` gives the
float model back on the same GraphModule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from fxcompress.calibration.gptq import gptq_layers
from fxcompress.batches import calibration_batches
from fxcompress.config import Boolean, Interval, Options, Regex, TypeOf, check_applicable, check_int, validate
from fxcompress.memory import release_freed_memory
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import (KINDS, TYPES_FIELD, Layer, chain_module_node, check_tied_rules, constant_value,
                               insert_on_weight, input_arg, kind_names, layer_node, select_layers, weight_arg)
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant import ActivationQuant, GridWeight, KMeansWeight, calibrate
from fxcompress.quant.kmeans1d import INITS
from fxcompress.quant.commuting import commutes_with_quantization, is_add
from fxcompress.quant.observers import OBSERVERS
from fxcompress.quant.quantizers import METHODS, SCALE_DTYPES, check_finite, check_groups, distinct_values
from fxcompress.rules import RULES_FIELD, Field, RuleSchema, choice, integer

from .lower_integer_graph import is_activation_quant, is_relu

# The origin documents' rule form: (parameter pattern, method, bits[, option]); the option is the
# k-means init, "symmetric" / "asymmetric" for linear, or the integer bits of a fixed-point format.
QUANT_RULES = RuleSchema("InsertFakeQuant.rules", [
    Field("method", choice(*METHODS, "float")),
    Field("bits", integer(1, 16)),
    Field("option", lambda raw: raw, default=None),
])

# Fields only some variants read: set on any other they would be ignored, so they are refused.
_METHOD_FIELDS = {"init": ("kmeans",), "seed": ("kmeans",), "fix_zeros": ("kmeans",),  # grids always hold 0
                  "symmetric": ("linear",), "int_bits": ("fixed_point",), "group_size": ("linear",),
                  "scale_dtype": ("linear",)}
_OBSERVER_FIELDS = {"momentum": ("moving_average",), "percentile": ("percentile",)}


@dataclass(frozen=True, kw_only=True)
class ActivationConfig:
    """Fake-quant of the inputs of quantized layers.

    observer  "minmax", "moving_average" (momentum) or "percentile" (percentile of each tail kept)
    freeze    True: the grid is fixed after calibration; False: observers keep following the data
              in training mode (quantization-aware training)
    joins     True: also put every operand of each residual add and concatenation whose operands are
              all quantized layers' outputs or already quantized values on a grid (a layer's output
              gets one of its own), so that LowerToInteger keeps the join integer
    fuse_adds with joins: a residual add of a convolution's own output (read by nothing else) and a value
              on a grid, whose sum meets a grid directly or through a ReLU, leaves that output unrounded: the
              sum is rounded once, where the add's result meets its grid. This is the model of a
              convolution that adds the residual inside its kernel (oneDNN's sum post-op, as PT2E's x86
              lowering models it), which LowerToInteger's native backend then runs: one kernel call, no
              separate add. Of two such convolutions the later in the graph takes the add.
    """

    bits: int = 8
    symmetric: bool = False
    observer: str = "minmax"
    momentum: float = 0.1
    percentile: float = 99.99
    freeze: bool = True
    joins: bool = False
    fuse_adds: bool = False

    constraints: ClassVar[dict] = {
        "bits": (Interval(int, 1, 16),), "symmetric": (Boolean(),), "observer": (Options(*OBSERVERS),),
        "momentum": (Interval(float, 0.0, 1.0, lo_open=True),), "percentile": (Interval(float, 50.0, 100.0),),
        "freeze": (Boolean(),), "joins": (Boolean(),), "fuse_adds": (Boolean(),),
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.symmetric:  # a symmetric grid needs room for -s, 0 and +s
            check_int("ActivationConfig", "bits", self.bits, 2, 16)
        check_applicable("ActivationConfig", self, _OBSERVER_FIELDS, {self.observer}, "observer")
        if self.fuse_adds and not self.joins:
            raise ConfigError("ActivationConfig.fuse_adds=True takes effect on the residual adds joins=True keeps "
                              "integer; set joins=True as well")

    def build(self) -> ActivationQuant:
        options = {"moving_average": {"momentum": self.momentum},
                   "percentile": {"percentile": self.percentile}}.get(self.observer, {})
        return ActivationQuant(self.bits, self.symmetric, self.observer, options)


@dataclass(frozen=True)
class LayerQuant:
    """How one layer's weight is quantized."""

    method: str
    bits: int
    init: str = "linear"
    symmetric: bool = False
    int_bits: int | None = None
    group_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class InsertFakeQuant(Pass):
    """Quantize selected linear / conv weights (and optionally their inputs) with fake-quant nodes.

    bits         bits per weight, 1..16 (a k-means codebook has at most 2^bits entries)
    method       "kmeans" (weight sharing), "linear" (uniform affine) or "fixed_point"
    init         k-means initialisation: "linear", "forgy", "density" or "kmeans++"
    per_channel  one grid / codebook per output channel instead of one per tensor
    symmetric    linear only: zero-point 0 and a range symmetric around 0 (needs bits >= 2)
    int_bits     fixed_point only: bits left of the binary point, sign included; None: the most
                 fraction bits for which no weight saturates
    group_size   linear only, linear layers only: one grid per group of this many consecutive input
                 channels within each output channel (GPTQ / AWQ's group layout; implies per channel);
                 on an embedding table, groups of each token's row (the rows a tied LM head computes)
    rounding     "nearest", or "gptq": error-feedback rounding through the inverse Hessian of each
                 layer's inputs on compile's calibration_data, block by block (linear layers)
    act_order    gptq only: round the input channels of largest Hessian diagonal first
    static_groups  gptq with group_size only: every group's grid from the weights before the sweep (GPTQ's
                 option of that name; act_order implies it) instead of from the group's weights as the sweep
                 reaches it
    scale_dtype  linear only: "float16" rounds every scale to half precision inside the fake-quant (as GPTQ
                 checkpoints keep them), so LowerToEncoded stores group steps in 16 bits exactly
    fix_zeros    exact zeros (pruned weights) stay exactly zero; k-means leaves them out of the clustering
    select       full-match regex over layer names; None: every layer
    types        layer kinds ("linear", "conv2d", ...) or module classes (nn.Conv2d) to restrict to
    rules        per-parameter rules (pattern, method, bits[, option]), a list or a text / YAML / JSON
                 file; only the layers they match are quantized ("float" leaves a layer alone)
    activations  ActivationConfig(...) to fake-quantize the inputs of the quantized layers
    seed         random seed of the forgy / kmeans++ initialisations
    """

    bits: int = 8
    method: str = "kmeans"
    init: str = "linear"
    per_channel: bool = False
    symmetric: bool = False
    int_bits: int | None = None
    fix_zeros: bool = True
    select: str | None = None
    types: tuple[str, ...] = ()
    rules: Any = None
    activations: ActivationConfig | None = None
    seed: int = 0
    group_size: int | None = None
    rounding: str = "nearest"
    act_order: bool = False
    static_groups: bool = False
    scale_dtype: str = "float32"

    preserves: ClassVar[tuple[type, ...]] = ()

    constraints: ClassVar[dict] = {
        "bits": (Interval(int, 1, 16),), "method": (Options(*METHODS),), "init": (Options(*INITS),),
        "per_channel": (Boolean(),), "symmetric": (Boolean(),),
        "int_bits": (Interval(int, 0), None),  # at most `bits`: checked with the method below
        "fix_zeros": (Boolean(),), "select": (Regex(), None), "types": TYPES_FIELD, "rules": RULES_FIELD,
        "activations": (TypeOf(ActivationConfig, what="an ActivationConfig(...)"), None),
        "seed": (Interval(int, 0),), "group_size": (Interval(int, 1), None),
        "rounding": (Options("nearest", "gptq"),), "act_order": (Boolean(),), "static_groups": (Boolean(),),
        "scale_dtype": (Options(*SCALE_DTYPES),),
    }

    def __post_init__(self) -> None:
        validate(self)
        _check_spec(self.default_spec(), "InsertFakeQuant")
        object.__setattr__(self, "types", kind_names(self.types))
        methods = {self.method}
        if self.rules is not None:
            rules = QUANT_RULES.load(self.rules)
            for rule in rules.rules:
                _check_spec(self.rule_spec(rule.values, rule.origin), rule.origin)
            object.__setattr__(self, "rules", rules)
            quantized = [rule for rule in rules.rules if rule.values["method"] != "float"]
            methods = {rule.values["method"] for rule in quantized}
            for name in ("method", "bits"):  # each rule gives its layer's method and bits: the field may only agree
                value, default = getattr(self, name), next(f.default for f in fields(self) if f.name == name)
                differing = [rule.origin for rule in quantized if rule.values[name] != value]
                if value != default and differing:
                    raise ConfigError(f"InsertFakeQuant.{name}={value!r} does not apply with rules: each rule gives "
                                      f"its layer's method and bits, and {differing[0]} says otherwise")
        check_applicable("InsertFakeQuant", self, _METHOD_FIELDS, methods, "method")
        check_applicable("InsertFakeQuant", self, {"act_order": ("gptq",), "static_groups": ("gptq",)},
                         {self.rounding}, "rounding")

    def default_spec(self) -> LayerQuant:
        return LayerQuant(self.method, self.bits, self.init, self.symmetric, self.int_bits,
                          self.group_size if self.method == "linear" else None)

    def rule_spec(self, values: dict[str, Any], origin: str) -> LayerQuant | None:
        """A rule's (method, bits, option) as a LayerQuant; None for "float"."""
        method, bits, option = values["method"], values["bits"], values["option"]
        if method == "float":
            return None
        if method == "kmeans":
            init = self.init if option is None else option
            if init not in INITS:
                raise ConfigError(f"{origin}: the k-means option is an init ({', '.join(INITS)}), got {option!r}")
            return LayerQuant(method, bits, init=init)
        if method == "linear":
            if option not in (None, "symmetric", "asymmetric"):
                raise ConfigError(f"{origin}: the linear option is 'symmetric' or 'asymmetric', got {option!r}")
            return LayerQuant(method, bits, symmetric=self.symmetric if option is None else option == "symmetric",
                              group_size=self.group_size)
        try:
            int_bits = self.int_bits if option is None else integer(0, 64)(option)
        except ValueError as exc:
            raise ConfigError(f"{origin}: the fixed_point option is its integer bits: {exc}") from None
        return LayerQuant(method, bits, int_bits=int_bits)

    def plan(self, gm: GraphModule) -> list[tuple[Layer, LayerQuant]]:
        """The layers this pass quantizes and how, in graph order."""
        layers = select_layers(gm, "InsertFakeQuant", self.types, self.select, required=True, warn_tied=True)
        if self.rules is None:
            return [(layer, self.default_spec()) for layer in layers]
        check_tied_rules(gm, self.rules, layers)
        assigned = self.rules.assign(layer.weight for layer in layers)
        specs = [(layer, self.rule_spec(rule.values, rule.origin)) for layer in layers
                 if (rule := assigned.get(layer.weight)) is not None]
        return [(layer, spec) for layer, spec in specs if spec is not None]

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        if self.activations is not None and ctx.calibration_data is None:
            raise PreconditionError("InsertFakeQuant.activations needs calibration data: pass "
                                    "compile(..., calibration_data=batches)")
        if self.rounding == "gptq" and ctx.calibration_data is None:
            raise PreconditionError("InsertFakeQuant.rounding='gptq' needs calibration data: pass "
                                    "compile(..., calibration_data=batches)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        plan = self.plan(gm)
        data = ctx.calibration_data
        if self.rounding == "gptq" and self.activations is not None:
            # two passes over the data (GPTQ's walk, then the observers): a generator would be used up by the
            # first. Listing holds the batches themselves until the pass ends: a list's are held already, and
            # a generator's are what GPTQ's walk holds at once anyway (it keeps every batch's inputs)
            data = calibration_batches(data, "InsertFakeQuant")
        if self.rounding == "gptq":  # block by block: each layer rounded on inputs the rounded layers before it give
            stats, report = gptq_layers(gm, data, plan, lambda layer, spec: self._quantize_weight(gm, layer, spec),
                                        act_order=self.act_order, static_groups=self.static_groups)
            stats.update(report.padding_stats())  # the padded positions left out of the Hessians
        else:
            stats = {}
            for layer, spec in ctx.each(plan, f"{self.method} weights", lambda item: item[0].name):
                stats[layer.name] = self._quantize_weight(gm, layer, spec)
                release_freed_memory()  # glibc keeps the layer's freed transients resident; hand them back
        if self.activations is not None and plan:
            layers = [layer for layer, _ in self.plan(gm)]  # nodes renamed
            inserted = self._insert_activations(gm, layers)
            if self.activations.joins:
                inserted += self._quantize_joins(gm, layers)
            gm.recompile()
            stats["calibration_batches"] = calibrate(gm, data, progress=ctx.progress)
            if stats["calibration_batches"] == 0:  # no observer saw anything: every activation would stay float
                raise PreconditionError(
                    f"InsertFakeQuant.activations: calibration_data yielded no batches; its {len(inserted)} activation "
                    "quantizers would observe nothing and stay off: give at least one batch "
                    "(a generator is used up after one pass: pass a list)")
            stats["activation_quant"] = inserted
            for name in inserted:
                gm.get_submodule(name).observing = not self.activations.freeze
        touched = tuple(layer.weight for layer, _ in plan)
        return PassResult(changed=bool(touched), params_touched=touched, stats=stats)

    def _quantize_weight(self, gm: GraphModule, layer: Layer, spec: LayerQuant) -> dict[str, Any]:
        node = layer_node(gm, layer)
        existing = chain_module_node(gm, node, (KMeansWeight, GridWeight))
        source = existing.args[0] if existing is not None else weight_arg(node)
        weight = (constant_value(gm, source) if source is not None
                  else gm.get_submodule(node.target).weight.detach())
        check_finite(weight, f"InsertFakeQuant: layer {layer.name!r} ({layer.weight})")
        axis = KINDS[layer.kind].out_dim if self.per_channel or spec.group_size is not None else None
        if spec.group_size is not None and KINDS[layer.kind].family == "embedding":
            axis = 0  # groups run along each token's row: a tied LM head's output channels, one grid for both
        if spec.group_size is not None:
            _check_groups(layer, weight, axis, spec.group_size)
        if spec.method == "kmeans":
            module = KMeansWeight.fit(weight, spec.bits, spec.init, fix_zeros=self.fix_zeros, axis=axis,
                                      seed=self.seed)
        else:
            module = GridWeight(spec.bits, spec.method, spec.symmetric, spec.int_bits, axis,
                                group_size=spec.group_size,
                                scale_dtype=self.scale_dtype if spec.method == "linear" else "float32")
        name = existing.target if existing is not None else f"{layer.weight}_quant"
        gm.add_submodule(name, module.to(weight.device))
        if existing is None:
            insert_on_weight(gm, layer, lambda graph, w: graph.call_module(name, (w,)))
        stats = {"method": spec.method, "bits": spec.bits}
        if isinstance(module, KMeansWeight) and module.axis in (None, 0):
            # decoded a chunk at a time from the codes (as_rows keeps the weight's order on these axes):
            # a whole quantized copy of the layer is never made
            flat = weight.detach().reshape(-1)
            pairs = ((flat[i:i + _CHUNK], module.decoded(i, i + _CHUNK)) for i in range(0, flat.numel(), _CHUNK))
            return stats | _pair_stats(pairs)
        with torch.no_grad():
            quantized = module(weight)
        stats |= _pair_stats(_chunks(weight, quantized))
        if isinstance(module, GridWeight):
            stats.update(_grid_losses(layer.name, spec, module, weight, quantized))
        return stats

    def _insert_activations(self, gm: GraphModule, layers: list[Layer]) -> list[str]:
        """An ActivationQuant on the input of each layer (shared by layers reading the same value)."""
        inserted: dict[Node, Node] = {}
        for layer in layers:
            if KINDS[layer.kind].family == "embedding":
                continue  # its input is token indices, not activations
            node = layer_node(gm, layer)
            x = input_arg(node)  # addmm reads its input second, after the bias
            if is_activation_quant(gm, x):
                gm.add_submodule(x.target, self.activations.build())  # quantized before: calibrate afresh
                inserted[x] = x
                continue
            if x not in inserted:
                owner = layer.weight.rpartition(".")[0]
                name = f"{owner}.input_quant" if owner else f"{node.name}_input_quant"
                gm.add_submodule(name, self.activations.build())
                with gm.graph.inserting_before(node):
                    inserted[x] = gm.graph.call_module(name, (x,))
            node.replace_input_with(x, inserted[x])
        return sorted({n.target for n in inserted.values()})


    def _quantize_joins(self, gm: GraphModule, layers: list[Layer]) -> list[str]:
        """Every operand of each add / cat between quantized values on a grid; the names of new ones."""
        kinds = {layer_node(gm, layer): layer.kind for layer in layers}
        produced = set(kinds)
        inserted = []
        for node in list(gm.graph.nodes):
            operands = join_operands(node)
            if operands is None:
                continue
            quants = [_operand_quant(gm, x, produced) for x in operands]
            if any(q is False for q in quants):
                continue  # an operand on no grid (not a quantized value): the join stays float
            fused = _fused_operand(gm, node, operands, kinds) if self.activations.fuse_adds else None
            for i, (x, quant) in enumerate(zip(operands, quants)):
                if x is fused:
                    continue  # the convolution adds the other operand in its kernel: its own output is not rounded
                if quant is None:  # a layer's raw output: a grid of its own
                    name = f"{node.name}_input{i}_quant"
                    gm.add_submodule(name, self.activations.build())
                    with gm.graph.inserting_before(node):
                        quant = gm.graph.call_module(name, (x,))
                    inserted.append(name)
                elif x.op == "placeholder":  # after every input, which torch.fx keeps at the front
                    gm.graph.find_nodes(op="placeholder")[-1].append(quant)
                else:
                    x.append(quant)  # right after its only input: before this join, wherever it stood
                node.replace_input_with(x, quant)
        return inserted


def join_operands(node: Node) -> list[Node] | None:
    """The tensors a residual add or a concatenation joins, or None for any other node."""
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        ok = isinstance(tensors, (list, tuple)) and tensors and all(isinstance(x, Node) for x in tensors)
        return list(tensors) if ok else None
    if not is_add(node):  # residual adds: two tensors of one shape, no alpha
        return None
    if len(node.args) != 2 or node.kwargs or not all(isinstance(x, Node) for x in node.args):
        return None
    shapes = [getattr(x.meta.get("tensor_meta"), "shape", None) for x in node.args]
    return list(node.args) if shapes[0] is not None and shapes[0] == shapes[1] else None


def _fused_operand(gm: GraphModule, add: Node, operands: list[Node], kinds: dict[Node, str]) -> Node | None:
    """The operand of a residual add a convolution can take into its kernel (ActivationConfig.fuse_adds): the
    later in the graph of the conv2d outputs read by the add alone, where the sum meets a grid (a dequantizing
    sum has no codes to accumulate into); None where there is none."""
    if not is_add(add) or not _reaches_grid(gm, add):
        return None
    hosts = [x for x in operands if kinds.get(x) == "conv2d" and len(x.users) == 1]
    order = {n: i for i, n in enumerate(gm.graph.nodes)} if len(hosts) > 1 else {}
    return max(hosts, key=order.get) if hosts else None


def _reaches_grid(gm: GraphModule, node: Node) -> bool:
    """Whether `node`'s value meets an activation grid directly or through one ReLU read by nothing else (what
    oneDNN's sum post-op can end in; the grid may have other readers: the next block's add reads it once its
    join is quantized)."""
    def quantized(value: Node) -> bool:
        return any(is_activation_quant(gm, u) for u in value.users)

    if quantized(node):
        return True
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return is_relu(gm, user) and user.args[:1] == (node,) and quantized(user)


def _operand_quant(gm: GraphModule, x: Node, produced: set[Node]) -> Node | None | bool:
    """The ActivationQuant already on `x`; None if `x` is a quantized layer's output (through ops that
    commute with quantization, which LowerToInteger runs on codes); False otherwise."""
    quant = next((u for u in x.users if is_activation_quant(gm, u)), None)
    if quant is not None:
        return quant
    current = x
    while current not in produced and commutes_with_quantization(gm, current) and current.args \
            and isinstance(current.args[0], Node):
        current = current.args[0]
    return None if current in produced else False


# Statistics are summed 65536 values at a time: whole-layer float64 copies of a large layer's
# weight, its quantized value, their difference and its square would cost 32 bytes a weight at once.
_CHUNK = 1 << 16


def _chunks(*tensors: torch.Tensor):
    flat = [t.detach().reshape(-1) for t in tensors]
    for start in range(0, flat[0].numel(), _CHUNK):
        yield [f[start:start + _CHUNK] for f in flat]


def _pair_stats(pairs) -> dict[str, Any]:
    """How many distinct values the quantized weight takes (each chunk's distinct values, then theirs)
    and its SQNR in dB, from (weight, quantized) chunk pairs in the weight's order."""
    noise = signal = 0.0
    distinct = []
    for w, q in pairs:
        distinct.append(distinct_values(q))
        w = w.to(torch.float64, copy=True)  # a copy even of a float64 weight: it is overwritten next
        signal += float((w ** 2).sum())
        w = w.sub_(q).square_()  # (w - q) ** 2 in float64, in place: the same values, no more chunk copies
        noise += float(w.sum())
    sqnr = float("inf") if noise == 0 else 10.0 * math.log10(signal / noise)
    return {"levels": int(distinct_values(torch.cat(distinct)).numel()), "sqnr_db": round(sqnr, 2)}


def _grid_losses(name: str, spec: LayerQuant, module: GridWeight, weight: torch.Tensor,
                 quantized: torch.Tensor) -> dict[str, int]:
    """How many nonzero weights the grid rounds to 0 and how many it clips at its ends.

    A grid that rounds every nonzero weight to 0 (a fixed-point format whose step dwarfs the
    weights) would silently turn the layer off, so it is refused.
    """
    nonzero = weight != 0
    zeroed = int((nonzero & (quantized == 0)).sum())
    grid = module.grid(weight)
    if zeroed and zeroed == int(nonzero.sum()):
        fmt = f", int_bits={spec.int_bits}" if spec.int_bits is not None else ""
        raise PreconditionError(
            f"InsertFakeQuant: layer {name!r} ({spec.method}, bits={spec.bits}{fmt}): the grid's step "
            f"{float(grid.scale.max()):g} rounds every weight to 0 (largest |w| is {float(weight.abs().max()):g}); "
            f"choose fewer int_bits, or int_bits=None to fit the format to the weights")
    scale, zero_point = grid.broadcast(weight, module.axis)
    codes = weight / scale + zero_point
    saturated = int(((codes < grid.qmin - 0.5) | (codes > grid.qmax + 0.5)).sum())
    return {"zeroed": zeroed, "saturated": saturated}


def _check_groups(layer: Layer, weight: torch.Tensor, axis: int, group_size: int) -> None:
    """Groups are runs of input channels of a linear layer's weight, and must tile each output row."""
    if KINDS[layer.kind].family not in ("linear", "embedding"):
        raise ConfigError(f"InsertFakeQuant.group_size={group_size}: layer {layer.name!r} is a {layer.kind} layer; "
                          f"groups of input channels are for linear layers and embedding tables (select them "
                          f"with types=('linear', 'embedding'))")
    check_groups(weight, axis, group_size, f"InsertFakeQuant.group_size: layer {layer.name!r} ({layer.weight})")


def _check_spec(spec: LayerQuant | None, owner: str) -> None:
    if spec is None:
        return
    check_int(owner, "bits", spec.bits, 1, 16)
    if spec.method == "linear" and spec.symmetric and spec.bits < 2:
        raise ConfigError(f"{owner}: symmetric linear quantization needs bits >= 2 (1 bit has no room for "
                          f"-s, 0 and +s); use symmetric=False, kmeans or fixed_point at 1 bit")
    if spec.int_bits is not None:  # int_bits > bits would put every weight below half a step: all zeros
        check_int(owner, "int_bits", spec.int_bits, 0, spec.bits)

