"""Verification after every pass: lint, recompile, a forward pass, output structure unchanged, and
(compile's check on a pass that reports changed=False) output values unchanged.

Every failure about a node names where the node came from (`tracing.origin`: the user's module path
and source line), not only its fx name, which the user never wrote."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

from .errors import ConfigError, VerificationError
from .execution import evaluating, locate_failure
from .tracing import origin


@dataclass(frozen=True)
class OutputSignature:
    """The structure of a model's outputs: pytree spec plus each leaf's shape and dtype, and a
    fingerprint of each leaf's values (not part of equality: passes may change values, not structure)
    with which `changed_values` tells whether a run computed the same outputs as another."""

    spec: str
    leaves: tuple[tuple[tuple[int, ...], torch.dtype] | str, ...]
    values: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, outputs: Any) -> OutputSignature:
        leaves, spec = tree_flatten(outputs)
        described = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                          for x in leaves)
        values = tuple(_fingerprint(x) if isinstance(x, torch.Tensor) else
                       (x if x is None or isinstance(x, (bool, int, float, str)) else None) for x in leaves)
        return cls(str(spec), described, values)

    def changed_values(self, before: OutputSignature) -> list[int]:
        """The indices of the output leaves whose values differ from `before`'s beyond rounding noise
        (all of them when the structures differ)."""
        if self != before or len(self.values) != len(before.values):
            return list(range(len(self.leaves)))
        return [i for i, (now, then, leaf) in enumerate(zip(self.values, before.values, self.leaves))
                if not _same_values(now, then, leaf[1] if isinstance(leaf, tuple) else None)]


# Values are kept as a fingerprint, not as the outputs themselves: a large model's outputs (logits) need not
# live through the passes. Each leaf is cut into at most _BLOCKS blocks of consecutive elements; a block
# keeps a position-weighted sum (a swap of two elements moves it), its sum of magnitudes (a scaling moves
# it) and its count of NaN / inf elements.
_BLOCKS = 1024
_CHUNK = 1 << 22  # elements converted to float64 at a time, to bound the check's transient memory


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    flat = (torch.view_as_real(x) if x.is_complex() else x).detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, 3, dtype=torch.float64)
    size = -(-n // min(_BLOCKS, n))
    # weights in [0.5, 1.5) that differ from one position to the next (fractional parts of multiples of
    # an irrational number), the same on every run
    weights = torch.arange(size, dtype=torch.float64, device=flat.device).mul_(0.7548776662466927).remainder_(1.0)
    weights.add_(0.5)
    rows, step = [], max(1, _CHUNK // size) * size
    for start in range(0, n, step):
        chunk = flat[start:start + step].to(torch.float64)
        chunk = torch.nn.functional.pad(chunk, (0, -chunk.numel() % size)).view(-1, size)
        bad = ~torch.isfinite(chunk)
        chunk = chunk.masked_fill(bad, 0.0)
        rows.append(torch.stack([(chunk * weights).sum(1), chunk.abs().sum(1), bad.sum(1, dtype=torch.float64)],
                                1).cpu())
    return torch.cat(rows)


def _same_values(now: Any, then: Any, dtype: torch.dtype | None) -> bool:
    if not isinstance(now, torch.Tensor) or not isinstance(then, torch.Tensor):
        return now == then
    if now.shape != then.shape:
        return False
    # the same graph on the same inputs may still round differently (a GPU's atomic adds): a tolerance of
    # a few units of the dtype's rounding, relative to each block's magnitude; integers compare exactly
    rtol = max(1e-5, 4 * torch.finfo(dtype).eps) if dtype is not None and dtype.is_floating_point else 0.0
    scale = torch.maximum(now[:, 1], then[:, 1]) * rtol
    return bool(((now[:, 0] - then[:, 0]).abs() <= scale).all() and ((now[:, 1] - then[:, 1]).abs() <= scale).all()
                and torch.equal(now[:, 2], then[:, 2]))


def forward(gm: GraphModule, example_inputs: tuple) -> Any:
    with evaluating(gm):
        return gm(*example_inputs)


def check_example_inputs(gm: GraphModule, example_inputs: tuple) -> Any:
    """The model's outputs on `example_inputs`, before any pass ran.

    A failure here is the inputs' fault, not a pass's: ConfigError naming the inputs that reach
    the failing node (index, shape, dtype) and the module it belongs to.
    """
    try:
        return forward(gm, example_inputs)
    except Exception as exc:
        node = locate_failure(gm, example_inputs)
        raise ConfigError(f"compile.example_inputs do not fit the model (no pass has run yet): "
                          f"{_input_failure(gm, example_inputs, node)}: {type(exc).__name__}: {exc}") from exc


def _input_failure(gm: GraphModule, example_inputs: tuple, node: Node | None) -> str:
    """Which inputs reach the failing node, and where in the model that node is."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if node is None or node.op == "placeholder" or len(example_inputs) > len(placeholders):
        return f"{len(example_inputs)} inputs given, the model's forward takes {[p.target for p in placeholders]}"
    upstream, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current not in upstream:
            upstream.add(current)
            pending.extend(current.all_input_nodes)
    culprits = [f"example_inputs[{i}] ({_describe(example_inputs[i])})" for i, p in enumerate(placeholders)
                if p in upstream and i < len(example_inputs)]
    hint = ""
    if node.target is torch._assert:
        # torch.fx checks an argument fixed by concrete_args against its value on every call
        hint = ("; an argument fixed by concrete_args must be given that value in example_inputs "
                "(in the forward's order)")
    else:
        # torch.fx traces every argument, one left at its default None included, as a tensor-like input:
        # `if mask is not None` then took the branch for a tensor, which a None (or a flag) cannot run
        traced = [p.target for i, p in enumerate(placeholders) if p in upstream and (
            i >= len(example_inputs) or example_inputs[i] is None or isinstance(example_inputs[i], bool))]
        if traced:
            hint = (f"; torch.fx traced {traced} as tensors (given None or a bool, or left at a default): "
                    f"fix such an argument with concrete_args={{{traced[0]!r}: value}}")
    return (f"{', '.join(culprits) or 'no input'} reaches {origin(node)}, which failed at {node.format_node()}"
            + hint)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def failing_node(gm: GraphModule, example_inputs: tuple) -> str:
    """' at node %x = ... (<origin>)' for the node that raises on `example_inputs`; '' if none does."""
    node = locate_failure(gm, example_inputs)
    return f" at node {node.format_node()} ({origin(node)})" if node is not None else ""


def verify_graph(gm: GraphModule, example_inputs: tuple | None, expected: OutputSignature | None,
                 label: str) -> OutputSignature | None:
    """Raise VerificationError (naming `label` and the failing node) if `gm` is not sound; the
    signature of its outputs on `example_inputs` (None without them)."""
    check_graph(gm, label)
    return None if example_inputs is None else verify_forward(gm, example_inputs, expected, label)


def verify_forward(gm: GraphModule, example_inputs: tuple, expected: OutputSignature | None,
                   label: str) -> OutputSignature:
    """verify_graph's forward pass (on gm's current code) and output check; the outputs' signature."""
    try:
        outputs = forward(gm, example_inputs)
    except Exception as exc:
        raise VerificationError(f"{label}: forward pass failed{failing_node(gm, example_inputs)}: "
                                f"{type(exc).__name__}: {exc}") from exc
    return check_outputs(gm, outputs, expected, label)


def check_graph(gm: GraphModule, label: str) -> None:
    """verify_graph's first half: the graph lints and compiles to Python (gm's code is then current)."""
    try:
        gm.graph.lint()
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # lint appends the whole graph
        raise VerificationError(f"{label}: the graph does not lint: {first_line}") from exc
    try:
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"{label}: the graph does not compile to Python: {exc}") from exc


def check_outputs(gm: GraphModule, outputs: Any, expected: OutputSignature | None, label: str) -> OutputSignature:
    """verify_graph's last step: `outputs` (of a run on the example inputs) have the `expected`
    structure (any, when None); their signature."""
    got = OutputSignature.of(outputs)
    if expected is not None and got != expected:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        raise VerificationError(
            f"{label}: outputs changed at {output.format_node()}: expected {expected.leaves} "
            f"({expected.spec}), got {got.leaves} ({got.spec}); {_changed_leaves(output, expected, got)}")
    return got


def _changed_leaves(output: Node, expected: OutputSignature, got: OutputSignature) -> str:
    """Which output nodes changed, and where each came from."""
    leaves = tree_flatten(output.args[0])[0]
    if len(leaves) != len(expected.leaves) or len(leaves) != len(got.leaves):  # an output node holds a tuple
        return "output nodes: " + "; ".join(f"{n.name}: {origin(n)}" for n in output.all_input_nodes)
    changed = [f"output {i} {leaf.name if isinstance(leaf, Node) else repr(leaf)}: {origin(leaf)}"
               for i, (leaf, before, after) in enumerate(zip(leaves, expected.leaves, got.leaves))
               if before != after and isinstance(leaf, Node)]
    return "; ".join(changed) or "no output node to name"
