"""Trained quantization: fake-quant modules, their quantizers and observers, and switches on a compiled model.

    gm = fxcompress.compile(model, [InsertFakeQuant(bits=5, method="kmeans")], example_inputs=(x,))
    set_quantization(gm, False)   # the float model, same GraphModule
    set_quantization(gm, True)
    freeze_observers(gm)          # activation grids stop following the data
    recluster(gm)                 # k-means assignments recomputed from the float weights
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..batches import TOKEN_MASK, PaddingIncludedWarning, batch_keep, bind_inputs, token_mask
from ..errors import PreconditionError
from ..execution import evaluating
from ..layers import constant_value
from .kmeans1d import KMeans1DResult, assign, initial_centroids, kmeans1d
from .modules import ActivationQuant, GridWeight, KMeansWeight
from .observers import MinMaxObserver, MovingAverageMinMaxObserver, Observer, PercentileObserver
from .quantizers import METHODS, Codebook, Grid, fake_quantize, fixed_point_grid, kmeans_codebook, linear_grid, quantize

FAKE_QUANT_MODULES = (KMeansWeight, GridWeight, ActivationQuant)


def fake_quant_modules(gm: nn.Module, kinds: tuple[type, ...] = FAKE_QUANT_MODULES) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every fake-quant module of `gm` of the given kinds."""
    return ((name, m) for name, m in gm.named_modules() if isinstance(m, kinds))


def set_quantization(gm: nn.Module, enabled: bool, *, weights: bool = True, activations: bool = True) -> int:
    """Switch fake-quant on or off (off: the float model); returns how many modules were switched."""
    kinds = ((KMeansWeight, GridWeight) if weights else ()) + ((ActivationQuant,) if activations else ())
    switched = 0
    for _, module in fake_quant_modules(gm, kinds):
        module.enabled = bool(enabled)
        switched += 1
    if isinstance(gm, GraphModule):
        sync_trainable(gm)
    return switched


def sync_trainable(gm: GraphModule) -> list[str]:
    """Freeze every parameter no gradient can reach; those a k-means switch brings back train again.

    An enabled KMeansWeight computes from its codebook and ignores its input's value, so the float
    weight behind it takes no part in the loss; switched off, it is the codebook that takes no part.
    The unused one stays (re-clustering and set_quantization read it) with requires_grad=False:
    DistributedDataParallel refuses trainable parameters that get no gradient, and an optimizer
    would decay them for nothing. Returns the names frozen.
    """
    reached, switched, idle = set(), set(), set()
    pending = [n for n in gm.graph.nodes if n.op == "output"]
    while pending:
        node = pending.pop()
        if node in reached:
            continue
        reached.add(node)
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), KMeansWeight):
            switched |= {n.target for n in _ancestors(node) if n.op == "get_attr"} | {f"{node.target}.codebook"}
            if module.enabled:
                continue
            idle.add(node.target)  # switched off: the float weight passes through, the codebook is unused
        pending.extend(node.all_input_nodes)
    live = {n.target for n in reached if n.op in ("get_attr", "call_module")} - idle
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}  # a tied parameter has several names
    for name, param in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), (param, []))[1].append(name)
    frozen = []
    for param, aliases in names.values():
        if any(_within(name, live) for name in aliases):
            if switched.intersection(aliases):
                param.requires_grad_(True)
        elif param.requires_grad:
            param.requires_grad_(False)
            frozen.append(aliases[0])
    return frozen


def _within(name: str, paths: set[str]) -> bool:
    """Whether `name` or one of the modules holding it is in `paths`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts) + 1))


def _ancestors(node: Node) -> set[Node]:
    found, pending = set(), list(node.all_input_nodes)
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            pending.extend(current.all_input_nodes)
    return found


def freeze_observers(gm: nn.Module, frozen: bool = True) -> int:
    """Stop (or restart) activation observers updating in training mode; returns how many."""
    modules = [m for _, m in fake_quant_modules(gm, (ActivationQuant,))]
    for module in modules:
        module.observing = not frozen
    return len(modules)


def calibrate(gm: nn.Module, data: Iterable[Any], *, progress: bool = False) -> int:
    """Run `data` through `gm` in eval mode, feeding every observer.

    A batch is a tensor, a tuple of inputs, or a dict bound to the inputs by name as the calibration
    walk binds it (a tokenizer's output: unknown keys are refused, a left-out input takes its default;
    a plain nn.Module is called as gm(**batch)). Where the model has an input named `attention_mask`
    of shape (batch, sequence), its zeros are padding: observers leave those positions out, as the
    calibration walk leaves them out of GPTQ's and Wanda's statistics; an activation whose layout does
    not line up with them is observed whole, with a PaddingIncludedWarning naming its quantizer.

    Returns the number of batches seen. The model's training flags are restored afterwards.
    A batch that gives an activation NaN or Inf raises PreconditionError naming the quantizer and
    the batch's index; quantizers it reached before that one have already taken it in.
    """
    named = list(fake_quant_modules(gm, (ActivationQuant,)))
    modules = [m for _, m in named]
    if not modules:
        raise PreconditionError("calibrate: the model has no activation fake-quant (InsertFakeQuant(activations=...))")
    if isinstance(data, Mapping):  # iterating it would make each key a batch (the walk refuses it alike)
        raise PreconditionError("calibrate: calibration_data is one dict; pass a list of batches ([batch])")
    bind = _binder(gm)
    if progress:
        from tqdm.auto import tqdm
        data = tqdm(data, desc="calibrating", unit="batch")
    batches = 0
    for module in modules:
        module.calibrating = True
        module.observer.padding_included = False
    try:
        with evaluating(gm):
            for batch in data:
                args, kwargs, keep = bind(batch, batches)
                for module in modules:
                    module.observer.keep = keep
                try:
                    gm(*args, **kwargs)
                except PreconditionError as exc:
                    culprit = next((name for name, m in named if m.observer is getattr(exc, "observer", None)), None)
                    if culprit is None:
                        raise  # not an observer's refusal
                    raise PreconditionError(f"calibrate: batch {batches} (counting from 0), activation quantizer "
                                            f"{culprit!r}: {exc}") from exc
                batches += 1
    finally:
        for module in modules:
            module.calibrating = False
            module.observer.keep = None  # the batch's mask is no state: later training observes every value
    included = [name for name, m in named if m.observer.padding_included]
    if included:
        warnings.warn(f"calibrate: the calibration batches' {TOKEN_MASK} marks padding, but the activations of "
                      f"{', '.join(included)} do not line up with its (batch, sequence) positions: their grids "
                      f"include the padded positions", PaddingIncludedWarning, stacklevel=2)
    return batches


def _binder(gm: nn.Module):
    """`bind(batch, index) -> (args, kwargs, keep)`: how `calibrate` calls `gm` on a batch, and the batch's
    kept positions (None: no padding to leave out). A GraphModule binds a dict by its placeholders' names
    with the calibration walk's own rule (so a batch either both accept or both refuse, in the same words),
    and its mask is its `attention_mask` placeholder's value, however the batch gave it."""
    if not isinstance(gm, GraphModule):
        def bind_module(batch: Any, index: int) -> tuple[tuple, dict, torch.Tensor | None]:
            if isinstance(batch, Mapping):  # the module's own signature binds (and refuses) the names
                return (), dict(batch), token_mask(batch.get(TOKEN_MASK))
            return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {}, None
        return bind_module
    nodes = list(gm.graph.nodes)

    def bind_graph(batch: Any, index: int) -> tuple[tuple, dict, torch.Tensor | None]:
        if isinstance(batch, Mapping):
            args = bind_inputs(nodes, batch, index)  # the walk's own binding: one rule, one set of messages
        else:
            args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        return args, {}, batch_keep(nodes, args)
    return bind_graph


def recluster(gm: GraphModule, seed: int = 0) -> int:
    """Re-run k-means on each k-means weight's float input (its chain before the fake-quant).

    Start each clustering from the current centroids. Useful after training the float weights
    with quantization switched off. Returns the number of layers re-clustered.
    """
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(module := gm.get_submodule(node.target), KMeansWeight):
            with torch.no_grad():
                module.recluster(constant_value(gm, node.args[0]), seed=seed)
            count += 1
    return count


__all__ = [
    "FAKE_QUANT_MODULES", "METHODS", "ActivationQuant", "Codebook", "Grid", "GridWeight", "KMeans1DResult",
    "KMeansWeight", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer", "PercentileObserver",
    "assign", "calibrate", "fake_quant_modules", "fake_quantize", "fixed_point_grid",
    "freeze_observers", "initial_centroids", "kmeans1d", "kmeans_codebook", "linear_grid", "quantize",
    "recluster", "set_quantization", "sync_trainable",
]
