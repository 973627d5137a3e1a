"""Sequential calibration: walk the graph block by block, each layer seeing the inputs that the
already-compressed layers before it produce (GPTQ's and SparseGPT's "sequential" mode).

Blocks are found from the layers' module paths: the first path component that is an index of a
repeated container (`model.layers.3`, `h.7`, `encoder.layer.0`) names a layer's block; a layer in
no repeated container (an `lm_head`) is a block of its own. Within a block, layers reading the
same value (q / k / v, gate / up) form one group and share one set of statistics.

Memory: the walker keeps, per calibration batch, only the values live where it stands in the
current block (the residual stream, the attention mask, rotary tables, an attention or MLP
intermediate), plus one group's statistics (one Hessian). Values computed from weights alone (a weight chain, a mask product) are never
kept: they are recomputed on demand, so a layer compressed a moment ago is read as it is now.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from ..batches import TOKEN_MASK, PaddingIncludedWarning, bind_inputs, calibration_batches, token_mask, token_rows
from ..errors import ConfigError, PreconditionError
from ..execution import evaluating
from ..layers import KINDS, Layer, input_arg, layer_node
from ..tracing import origin
from .hessian import InputStats

# The layer families whose input is (..., in_features) and whose weight reads it as a matrix.
CALIBRATED_FAMILIES = ("linear",)
@dataclass(frozen=True)
class Group:
    """Layers of one block that read the same input value."""

    layers: tuple[Layer, ...]
    input: Node

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def check_calibrated(layers: Sequence[Layer], owner: str) -> None:
    """Only linear-family layers have one input-channel axis the statistics can describe."""
    others = [f"{layer.name} ({layer.kind})" for layer in layers if KINDS[layer.kind].family not in CALIBRATED_FAMILIES]
    if others:
        raise ConfigError(f"{owner} calibrates linear layers only; the selection also holds {', '.join(others)}: "
                          f"restrict it with types=('linear',) or select=...")


def block_key(name: str, repeated: set[str]) -> str:
    """The block a layer belongs to: its path up to the first index of a repeated container."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and ".".join(parts[:i]) in repeated:
            return ".".join(parts[:i + 1])
    return name


def repeated_containers(names: Iterable[str]) -> set[str]:
    """Paths that are followed by at least two different indices among the layer names."""
    seen: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                seen.setdefault(".".join(parts[:i]), set()).add(part)
    return {prefix for prefix, indices in seen.items() if len(indices) > 1}


def plan_blocks(gm: GraphModule, layers: Sequence[Layer]) -> list[list[Group]]:
    """The layers as blocks (runs of consecutive layers, in graph order, with one block key), each a
    list of groups in the order their inputs are computed."""
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    nodes = {node.name: node for node in gm.graph.nodes}
    ordered = sorted(layers, key=lambda layer: order[layer.node])
    repeated = repeated_containers(layer.name for layer in ordered)
    runs: list[list[Layer]] = []
    for layer in ordered:
        key = block_key(layer.name, repeated)
        if runs and block_key(runs[-1][-1].name, repeated) == key:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    blocks = []
    for run in runs:
        by_input: dict[Node, list[Layer]] = {}
        for layer in run:
            x = input_arg(nodes[layer.node])
            if not isinstance(x, Node):
                raise PreconditionError(f"layer {layer.name!r}: its input is no graph value ({x!r})")
            by_input.setdefault(x, []).append(layer)
        inputs = sorted(by_input, key=lambda n: order[n.name])
        blocks.append([Group(tuple(by_input[x]), x) for x in inputs])
    return blocks


class _Runner:
    """Runs slices of a graph node by node on per-batch environments (torch.fx's Interpreter)."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((self.index[u] for u in node.users), default=self.index[node])
                         for node in self.nodes}
        self.weights_only = _weights_only(self.nodes)
        # weight-derived values are the same for every batch while no weight changes: computed once
        # per runner (a runner is rebuilt after each compression)
        self.cache: dict[Node, Any] = {}
        self.interpreter = Interpreter(gm, garbage_collect_values=False)

    def start(self, batch: Any, index: int) -> dict[Node, Any]:
        """The environment of a batch: its values bound to the placeholders (a dict binds them by name, as
        a tokenizer's output is passed to a model: gm(**batch))."""
        if isinstance(batch, Mapping):
            inputs = bind_inputs(self.nodes, batch, index)
        else:
            inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        self.interpreter.args_iter = iter(inputs)
        env: dict[Node, Any] = {}
        self.interpreter.env = env
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = self._run_node(node, index)
        return env

    def run(self, env: dict[Node, Any], start: int, stop: int, index: int) -> dict[Node, Any]:
        """Run nodes [start, stop) on a copy of `env` (batch `index`); the copy holds every value computed."""
        env = dict(env)
        self.interpreter.env = env
        for node in self.nodes[start:stop]:
            if node.op in ("placeholder", "output") or node in self.weights_only:
                continue
            self._ensure_inputs(node, env)
            env[node] = self._run_node(node, index)
        return env

    def _run_node(self, node: Node, index: int) -> Any:
        try:
            return self.interpreter.run_node(node)
        except Exception as exc:  # a batch the model cannot run: name it and the node, as compile names inputs
            raise PreconditionError(f"calibration batch {index} fails at node {node.name!r} ({origin(node)}): "
                                    f"{type(exc).__name__}: {exc}") from exc

    def keep_live(self, env: dict[Node, Any], position: int) -> dict[Node, Any]:
        """Only the values a node at or after `position` still reads (the block boundary's state)."""
        return {node: value for node, value in env.items()
                if node not in self.weights_only and self.last_use[node] >= position}

    def _ensure_inputs(self, node: Node, env: dict[Node, Any]) -> None:
        for arg in node.all_input_nodes:
            if arg in env:
                continue
            if arg not in self.weights_only:
                raise PreconditionError(f"sequential calibration: {arg.format_node()} is read by "
                                        f"{node.format_node()} but was computed before the kept boundary")
            if arg not in self.cache:
                self._ensure_inputs(arg, env)
                self.cache[arg] = self.interpreter.run_node(arg)
            env[arg] = self.cache[arg]


def _weights_only(nodes: Sequence[Node]) -> set[Node]:
    """Nodes whose value depends on no placeholder: weights, weight chains, constant tables."""
    found: set[Node] = set()
    for node in nodes:
        if node.op == "get_attr" or (node.op.startswith("call_") and all(a in found for a in node.all_input_nodes)
                                     and node.all_input_nodes and not _random(node)):
            found.add(node)
    return found


def _random(node: Node) -> bool:
    """Ops whose value is not a function of their inputs (kept in the order they ran)."""
    return "rand" in getattr(node.target, "__name__", str(node.target))


Handler = Callable[..., dict[str, Any]]


class Probe:
    """The stored per-batch states at a group's input, for a handler that must read more than the
    group's statistics: `run(node)` runs every batch on from there to a later node with the weights as
    they are now (a candidate's effect on a downstream value), keeping nothing (`each(node)`: the same,
    one batch at a time); `replace(node, fn)` rewrites a stored value (a handler that rescaled the
    producer of its own input)."""

    def __init__(self, runner: _Runner, states: list[dict[Node, Any]], done: Node,
                 keeps: Sequence[torch.Tensor | None] = ()) -> None:
        self.runner, self.states, self.position = runner, states, runner.index[done] + 1
        self.keeps = list(keeps) or [None] * len(states)

    def run(self, node: Node) -> list[Any]:
        return list(self.each(node))

    def each(self, node: Node) -> Iterator[Any]:
        """`run(node)` one batch at a time, each computed when asked for: a caller may stop early, and
        only one batch's values are held at once. The weights must stay as they are until it is done."""
        self.runner.cache.clear()   # weight-derived values are recomputed: the handler may have changed weights
        stop = max(self.runner.index[node] + 1, self.position)
        for i, state in enumerate(self.states):
            yield self.runner.run(state, self.position, stop, i)[node]

    def tokens(self, node: Node) -> Iterator[Any]:
        """`each(node)` as its rows (n, channels) at unpadded positions where a batch has padding; a batch
        without padding, or a value whose rows do not line up with the positions, is given as it is."""
        for i, value in enumerate(self.each(node)):
            rows = None if self.keeps[i] is None else token_rows(value, self.keeps[i])
            yield value if rows is None else rows

    def replace(self, node: Node, fn: Callable[[Any], Any]) -> None:
        for state in self.states:
            if node in state:
                state[node] = fn(state[node])


def value_at(gm: GraphModule, inputs: tuple, node: Node) -> Any:
    """`node`'s value when `gm` runs on `inputs`, the graph run only as far as that node."""
    runner = _Runner(gm)
    with evaluating(gm), torch.no_grad():
        return runner.run(runner.start(inputs, 0), 0, runner.index[node] + 1, 0)[node]


@dataclass
class WalkReport:
    """What a walk did: the blocks, each layer's report, and the most bytes it held at once."""

    blocks: list[list[list[str]]]
    layers: dict[str, Any]
    batches: int
    peak_held_bytes: int
    padded_tokens: int = 0                       # positions the attention mask left out of the statistics
    padding_included: tuple[str, ...] = ()       # layers whose statistics still hold them (rows not aligned)

    def padding_stats(self) -> dict[str, Any]:
        """The padding a pass reports beside its layers, only where there was some (InsertFakeQuant's other
        keys are all layer names)."""
        stats: dict[str, Any] = {}
        if self.padded_tokens:
            stats["calibration_padded_tokens"] = self.padded_tokens
        if self.padding_included:  # the walk warned as well
            stats["calibration_padding_included"] = list(self.padding_included)
        return stats


def walk(gm: GraphModule, layers: Sequence[Layer], data: Sequence | None, handle: Handler, *, owner: str,
         hessian: bool = True, probe: bool = False) -> WalkReport:
    """Calibrate `layers` group by group in graph order; `handle(group, stats)` compresses a group
    (changing its weights in `gm`) and returns a report per layer name.

    The stored per-batch states are run forward to each group's input, with every earlier group
    already compressed; the group's statistics are taken there and the states keep only what later
    nodes read. A group's input does not depend on the group itself, so nothing is run twice: one
    walk costs one forward pass of the calibration data. `data` is compile's `calibration_data`.
    With `probe`, the handler is called as `handle(group, stats, Probe(...))`.

    Padding: where the graph has an input named `attention_mask` of shape (batch, sequence), its zero
    positions are left out of every group's statistics (and of a probe's `tokens`); a group whose input rows
    do not line up with those positions keeps them, with a PaddingIncludedWarning naming it.
    """
    batches = calibration_batches(data, owner)
    check_calibrated(layers, owner)
    blocks = plan_blocks(gm, layers)
    reports: dict[str, Any] = {}
    peak, done = 0, None  # done: the last node the stored states have run through
    with evaluating(gm), torch.no_grad():
        runner = _Runner(gm)
        states = [runner.start(batch, i) for i, batch in enumerate(batches)]
        # the mask is read now: the states drop the input once no later node reads it
        masks = [node for node in runner.nodes if node.op == "placeholder" and node.target == TOKEN_MASK]
        keeps = [token_mask(state[masks[0]]) if masks else None for state in states]
        included: list[str] = []
        for block in blocks:
            for group in block:
                # a handler may rewrite the graph (a layer turned functional, chain nodes added): re-read it
                runner = _Runner(gm)
                x = input_arg(layer_node(gm, group.layers[0]))
                stats = InputStats(_width(gm, group), with_hessian=hessian, name=", ".join(group.names))

                def visit(i: int, env: dict[Node, Any]) -> None:
                    value = env[x]
                    plain = keeps[i] is None or not isinstance(value, torch.Tensor)
                    rows = value if plain else token_rows(value, keeps[i])
                    if rows is None:   # not one row per position: every row, padding too (warned below)
                        rows = value
                        if not included or included[-1] != stats.name:
                            included.append(stats.name)
                    stats.update(rows, i)   # a value of the wrong kind or width is refused there, as it is

                done = _advance(runner, states, done, x, visit)
                stats.check(owner, group.names)   # no tokens, or NaN / Inf: refused by name, never compressed from
                peak = max(peak, _held(states) + stats.nbytes())
                reports.update(handle(group, stats, Probe(runner, states, done, keeps)) if probe
                               else handle(group, stats))
            runner = _Runner(gm)
            last = max((layer_node(gm, layer) for group in block for layer in group.layers), key=runner.index.get)
            done = _advance(runner, states, done, last, None)  # through the block's last layer, compressed
    if included:
        warnings.warn(f"{owner}: the calibration batches' attention_mask marks padding, but the input rows of "
                      f"{'; '.join(included)} do not line up with its (batch, sequence) positions: their statistics "
                      f"include the padded positions", PaddingIncludedWarning, stacklevel=3)
    padded = sum(int((~keep).sum()) for keep in keeps if keep is not None)
    return WalkReport([[g.names for g in block] for block in blocks], reports, len(batches), peak, padded,
                      tuple(included))


def _advance(runner: _Runner, states: list[dict[Node, Any]], done: Node | None, until: Node,
             visit: Callable[[int, dict[Node, Any]], None] | None) -> Node:
    """Run every state from after `done` through `until` (if not already past it); `visit(i, env)`
    sees each batch's environment before the state keeps only what later nodes read. Returns the
    last node the states have now run through."""
    position = 0 if done is None else runner.index[done] + 1
    stop = max(runner.index[until] + 1, position)
    for i, state in enumerate(states):  # one at a time: the old state goes as the new one comes
        env = runner.run(state, position, stop, i)
        if visit is not None:
            visit(i, env)
        states[i] = runner.keep_live(env, stop)
        del env, state
    return runner.nodes[stop - 1]


def _width(gm: GraphModule, group: Group) -> int:
    """The input channels of the group's layers (they read one value, so they agree)."""
    widths = {_in_features(gm, layer) for layer in group.layers}
    if len(widths) != 1:
        raise PreconditionError(f"layers {group.names} read one value but take {sorted(widths)} input channels")
    return widths.pop()


def _in_features(gm: GraphModule, layer: Layer) -> int:
    return operator.attrgetter(layer.weight)(gm).shape[KINDS[layer.kind].in_dim]


def _held(states: Sequence[dict[Node, Any]]) -> int:
    """Bytes of the tensors the boundary states hold (each tensor counted once)."""
    seen: dict[int, int] = {}
    for state in states:
        for value in state.values():
            for tensor in _tensors(value):
                seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []
