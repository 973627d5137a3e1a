"""Masks to and from torch.nn.utils.prune, and lottery-ticket rewinding (Frankle & Carbin 2019).

torch.nn.utils.prune keeps `weight_orig` (a parameter), `weight_mask` (a buffer) and a forward
pre-hook that sets `weight = weight_orig * weight_mask`; fxcompress keeps `weight` and
`weight_mask` and a mul node in the graph. The two functions here convert between them.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import prune

from ..compile import compile as compile_model
from ..errors import ConfigError, PreconditionError
from ..history import append_record
from ..layers import find_layers
from ..pass_base import PassRecord
from ..verify import OutputSignature, forward, verify_graph
from .masks import get_mask, mask_name, masked_layers, set_mask


def export_to_torch_prune(gm: GraphModule, model: nn.Module) -> nn.Module:
    """Load `gm`'s weights into `model` (same architecture, not yet pruned) and prune it with `gm`'s masks.

    Afterwards `model` carries torch.nn.utils.prune's `weight_orig` / `weight_mask` and computes
    what `gm` computes. A weight the model ties to another (an LM head's, its embedding's tensor) is
    pruned under each of its names with the one mask. Returns `model`.
    """
    masks = {layer.weight: get_mask(gm, layer) for layer in masked_layers(gm)}
    state = {k: v for k, v in gm.state_dict().items() if k not in {mask_name(w) for w in masks}}
    # the GraphModule stores a tied tensor once, under its first name; the model lists it under each
    aliases = _aliases(model)
    for name, first in aliases.items():
        if name not in state and first in state:
            state[name] = state[first]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"export_to_torch_prune: the model does not match the GraphModule's parameters "
                          f"(is it already pruned, or another architecture?): {exc}") from exc
    for weight, mask in masks.items():
        # torch.nn.utils.prune swaps the named attribute only: a tied reader left out would keep the dense tensor
        for name in [weight, *(alias for alias, first in aliases.items() if first == weight)]:
            owner, _, attr = name.rpartition(".")
            prune.custom_from_mask(model.get_submodule(owner), attr, mask.clone())
    return model


def _aliases(model: nn.Module) -> dict[str, str]:
    """Each later name of a tensor the model holds under several names -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.update({name: first[id(tensor)]} if id(tensor) in first else {})
        first.setdefault(id(tensor), name)
    return aliases


def import_from_torch_prune(model: nn.Module, example_inputs: tuple, **compile_options) -> GraphModule:
    """A masked GraphModule from a model pruned with torch.nn.utils.prune (the model is not changed).

    Every `<param>_orig` / `<param>_mask` pair becomes fxcompress's `<param>` + mask node.
    `compile_options` go to fxcompress.compile (leaf_modules, concrete_args).
    """
    model = _copy_pruned(model)
    masks = {}
    for path, module in model.named_modules():
        for hook in _pruning_hooks(module):
            masks[f"{path}.{hook._tensor_name}" if path else hook._tensor_name] = \
                getattr(module, f"{hook._tensor_name}_mask").detach().clone()
            prune.remove(module, hook._tensor_name)  # weight = weight_orig * weight_mask, made permanent
    gm = compile_model(model, [], example_inputs, inplace=True, **compile_options)
    found = find_layers(gm)
    layers, by_name = {}, {layer.name: layer for layer in found}
    for layer in found:
        layers.setdefault(layer.weight, layer)  # a tied weight's first layer owns its mask
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise PreconditionError(f"import_from_torch_prune: masks on {unknown} are not weights of linear / conv "
                                f"layers fxcompress can mask")
    expected = OutputSignature.of(forward(gm, tuple(example_inputs)))
    for weight, mask in masks.items():
        layer = layers[weight]
        if layer.tied_to is not None:
            # one tensor, one mask node on its first layer's chain, read by both: the tied reader's mask
            # must be that one (torch.nn.utils.prune let each name carry its own)
            first = by_name[layer.tied_to].weight
            if first not in masks or not torch.equal(masks[first].ne(0), mask.ne(0)):
                raise PreconditionError(f"import_from_torch_prune: {weight} is tied to {first}, but their torch "
                                        f"pruning masks differ; a tied weight carries one mask here")
            continue
        set_mask(gm, layer, mask.ne(0))
    verify_graph(gm, tuple(example_inputs), expected, "import_from_torch_prune")
    append_record(gm, PassRecord("import_from_torch_prune", {"masks": sorted(masks)}, changed=bool(masks),
                                 params_touched=tuple(sorted(masks))))
    return gm


def _pruning_hooks(module: nn.Module) -> list[prune.BasePruningMethod]:
    return [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def _copy_pruned(model: nn.Module) -> nn.Module:
    """A deep copy of a torch-pruned model; its computed `weight` attributes (non-leaf tensors
    that deepcopy refuses) are copied detached, through deepcopy's memo."""
    memo = {}
    for module in model.modules():
        for hook in _pruning_hooks(module):
            value = getattr(module, hook._tensor_name, None)
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def rewind(gm: GraphModule, initial_state: Mapping[str, torch.Tensor]) -> GraphModule:
    """Reset every parameter (and buffer) of `gm` to `initial_state`, keeping the masks (a lottery ticket).

    `initial_state` is a state_dict saved before training (e.g. `copy.deepcopy(model.state_dict())`);
    masked weights are reset and stay zero where pruned. Returns `gm`, changed in place.
    """
    masks = {layer.weight: get_mask(gm, layer) for layer in masked_layers(gm)}
    mask_buffers = {mask_name(w) for w in masks}
    with torch.no_grad():
        for name, tensor in gm.state_dict(keep_vars=True).items():
            if name in mask_buffers:
                continue
            if name not in initial_state:
                raise ConfigError(f"rewind: initial_state has no entry for {name!r}")
            value = initial_state[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ConfigError(f"rewind: initial_state[{name!r}] has shape {tuple(value.shape)}, "
                                  f"the model's is {tuple(tensor.shape)}")
            tensor.copy_(value * masks[name] if name in masks else value)
    return gm


__all__ = ["export_to_torch_prune", "import_from_torch_prune", "rewind"]
