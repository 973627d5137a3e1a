"""Export to the compressed-tensors checkpoint format (what vLLM and transformers load).

    to_compressed_tensors(gm, "out/", config=model.config.to_dict())   # W4A16 / W8A16, pack-quantized
    to_compressed_tensors(gm, "out/", format="dense")                  # a pruned model, zeros in place

"pack-quantized" writes, for every linear layer whose weight chain ends in a linear grid of at
most 8 bits (`InsertFakeQuant(method="linear", per_channel=True)` or `group_size=N`):

    <layer>.weight_packed      int32 (out, ceil(in * bits / 32)): codes offset to unsigned, packed
                               densely from bit 0 of word 0, 32 codes in `bits` words
    <layer>.weight_scale       float32 (out, groups)
    <layer>.weight_zero_point  int32 (ceil(out * bits / 32), groups), asymmetric grids only: signed
                               zero-points packed along the output dim
    <layer>.weight_shape       int64 (2,)

and config.json's `quantization_config` (quant_method "compressed-tensors", one config group per
grid kind, its targets the layers' module paths). Codes are stored signed, as compressed-tensors
reads them: an asymmetric b-bit grid's codes and zero-point are both shifted by 2^(b-1), which
leaves (q - z) * scale, and so every dequantized weight, bit-identical to our fake-quant weight
(checked here before anything is written). Every other tensor is written as it is computed
(masked, fake-quantized weights as their float values); the file layout is written here, so the
export needs only `safetensors`, while `compressed-tensors` reads it back in the tests.

A half-precision model's packed weights dequantize (in float32) to values that round to its fake-quant
weights in its dtype. A disabled quantizer's layer is written as the float weight it computes with;
activation fake-quant, which the format cannot hold, is refused, and so is a quantized weight that another
layer reads tied (an LM head tied to its quantized token embedding): the format would give that layer none. Both files are written to temporary
files renamed into place: a failed export leaves the directory as it was.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import ConfigError, FormatError, MissingDependencyError
from .layers import (KINDS, Layer, WeightTransform, chain_module_node, chain_transforms, constant_value,
                     effective_weight, find_layers, inverse_scale_name, layer_node)
from .pruning.masks import get_mask, mask_name
from .quant.channel_grid import per_channel_grid
from .quant.modules import ActivationQuant, GridWeight
from .quant.quantizers import GroupedCodes, grouped_codes

FORMATS = ("pack-quantized", "dense")
QUANT_METHOD = "compressed-tensors"


@dataclass(frozen=True)
class PackedLayer:
    """One linear layer's weight on a grid, ready to write."""

    layer: Layer
    bits: int
    symmetric: bool
    group_size: int | None     # None: one grid per output channel ("channel" strategy)
    codes: GroupedCodes


def to_compressed_tensors(gm: GraphModule, directory: str | os.PathLike, format: str = "pack-quantized",
                          config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write model.safetensors and config.json (`config`, e.g. a transformers config as a dict,
    plus `quantization_config` when layers are packed) into `directory`; returns what was written."""
    if format not in FORMATS:
        raise ConfigError(f"to_compressed_tensors: format={format!r} is not one of {', '.join(FORMATS)}")
    _check_no_inserted_scales(gm)
    _check_no_split_experts(gm)
    _check_no_activation_quant(gm)
    packed = packed_layers(gm) if format == "pack-quantized" else []
    tensors, tied = _tensors(gm, packed)
    # a quantization_config the caller's config brought (that of the checkpoint the model was loaded from)
    # describes tensors this export did not write: transformers would read the dense weights as packed ones
    data = {key: value for key, value in dict(config or {}).items() if key != "quantization_config"}
    if packed:
        data["quantization_config"] = quantization_config(packed, [l.name for l in find_layers(gm)
                                                                    if l.name not in {p.layer.name for p in packed}])
    text = _config_text(data)   # before anything is written: a config json cannot hold leaves no files behind
    out = Path(directory)
    size = _write_directory(out, tensors, text)
    return {"format": format, "packed_layers": [p.layer.name for p in packed], "tied_skipped": tied,
            "bytes": size}


def _check_no_inserted_scales(gm: GraphModule) -> None:
    """A layer input multiplied by scales of its own (`ScaleChannels(insert_scales=True)`) has no place in
    the modeling code that reads the checkpoint: written anyway, the buffer would be ignored, the model wrong."""
    tensors = dict(gm.named_buffers())
    for layer in find_layers(gm):
        name = inverse_scale_name(layer.weight)
        if name in tensors:
            raise ConfigError(f"to_compressed_tensors: layer {layer.name!r} reads its input times {name}, a scale "
                              "ScaleChannels(insert_scales=True) put in a node of its own, which a compressed-tensors "
                              "checkpoint cannot hold; run ScaleChannels without insert_scales for this export, or "
                              "save with fxcompress.save")


# an expert the export front end split from transformers 5's stacked experts tensor: `...experts.gate_up_proj.3`
_SPLIT_EXPERT = re.compile(r"\.experts\.[A-Za-z_]\w*\.\d+$")


def _check_no_split_experts(gm: GraphModule) -> None:
    """transformers 5 stores a layer's experts as one (experts, out, in) tensor, which the export front end splits
    into a linear layer per expert (`frontends.experts`); written under their own names, transformers would not
    find them (it warns and leaves the experts as initialized) and the checkpoint would compute something else."""
    split = [layer.name for layer in find_layers(gm) if _SPLIT_EXPERT.search(layer.name)]
    if split:
        raise ConfigError(f"to_compressed_tensors: {len(split)} layers are experts of transformers 5's stacked "
                          f"expert tensors, split into one linear layer each by the export front end (first: "
                          f"{split[0]!r}); transformers reads such a checkpoint's experts as one tensor per layer "
                          "and would not load them: save with fxcompress.save")


def _check_no_activation_quant(gm: GraphModule) -> None:
    """An input fake-quant (`InsertFakeQuant(activations=...)`) is a step of the model's computation the
    export cannot write (its observers are ours, the config's input_activations stay None): left out, the
    checkpoint would compute with float activations, a different model than the one calibrated."""
    active = [name for name, module in gm.named_modules()
              if isinstance(module, ActivationQuant) and module.enabled and module.grid() is not None]
    if active:
        raise ConfigError(f"to_compressed_tensors: {len(active)} activations are fake-quantized (first: {active[0]!r}, "
                          "from InsertFakeQuant(activations=...)), which a W4A16 / W8A16 checkpoint does not "
                          "hold; quantize weights only, or turn activation quantization off first "
                          "(fxcompress.quant.set_quantization), or save with fxcompress.save")


def packed_layers(gm: GraphModule) -> list[PackedLayer]:
    """Every linear layer whose weight ends in a linear grid of at most 8 bits, with its codes;
    a quantized layer the format cannot express is a ConfigError naming it and why."""
    found = []
    layers = find_layers(gm)
    for layer in layers:
        node = layer_node(gm, layer)
        grid_node = chain_module_node(gm, node, GridWeight) if node.op == "call_function" else None
        others = [type(t).__name__ for t in (chain_transforms(gm, node) if node.op == "call_function" else [])
                  if not isinstance(t, GridWeight)]
        if others and layer.tied_to is None:
            raise ConfigError(f"to_compressed_tensors: layer {layer.name!r}: its weight goes through {others[0]} "
                              "(pack-quantized holds linear integer grids); use format='dense' to write its "
                              "float values")
        if grid_node is None or layer.tied_to is not None:
            continue
        module: GridWeight = gm.get_submodule(grid_node.target)
        if not module.enabled:
            continue   # set_quantization(gm, False): the layer computes with float weights, written as such
        _check_not_tied(layer, module, grid_node.target, layers)
        why = _unpackable(layer, module)
        if why:
            raise ConfigError(f"to_compressed_tensors: layer {layer.name!r} ({grid_node.target}): {why}; "
                              "use format='dense' to write its float values")
        codes, group_size = _codes(module, constant_value(gm, grid_node.args[0]))
        weight = effective_weight(gm, layer)
        # compressed-tensors dequantizes in the scales' float32; a half-precision model's fake-quant weight is
        # that value rounded to its dtype, which is what loading the checkpoint into the model gives it
        if not torch.equal(codes.dequantize().to(weight.dtype), weight):
            raise FormatError(f"to_compressed_tensors: layer {layer.name!r}: its weight chain does not end in "
                              f"its grid ({grid_node.target} is followed by other steps)")
        found.append(PackedLayer(layer, module.bits, module.symmetric, group_size, codes))
    return found


def _check_not_tied(layer: Layer, module: GridWeight, quantizer: str, layers: list[Layer]) -> None:
    """A quantized weight that other layers read too (an LM head tied to its token embedding, whose table
    is then quantized once, through the embedding): the format holds one target's weight under that target's
    name (`<target>.weight_packed`, no `.weight`), and a config group describes Linear targets only, so the
    tied layer would have no weight to load (transformers ties the head to a `weight` that is not there) and
    an embedding target cannot be packed at all. Refused by the tied layer's name, with what to do."""
    tied = [other for other in layers if other.tied_to == layer.name]
    if not tied:
        return
    names = ", ".join(f"{other.name!r} ({other.kind})" for other in tied)
    # the common case, a head tied to its token embedding: leaving embeddings out leaves the pair float
    how = " (InsertFakeQuant(types=('linear',)) leaves the embedding and its tied head float)" \
        if layer.kind == "embedding" else ""
    raise ConfigError(f"to_compressed_tensors: layer {names} is tied to {layer.name!r} ({layer.kind}), whose weight "
                      f"tensor it reads, and that weight is quantized ({quantizer}: {module.method}, {module.bits} "
                      f"bits); a pack-quantized checkpoint holds it packed under {layer.name!r} only, which leaves "
                      f"{tied[0].name!r} no weight to load. Quantize without {layer.name!r}{how}, untie the weights "
                      "before compiling, or use format='dense' to write the quantized values as floats")


def _codes(module: GridWeight, weight: torch.Tensor) -> tuple[GroupedCodes, int | None]:
    """The layer's codes and group size: a group-wise grid whose groups agree within every output
    channel is that channel's grid, written with the "channel" strategy (one scale per row)."""
    if module.group_size is not None and not isinstance(grid := per_channel_grid(module, weight), str):
        return grouped_codes(weight, grid, module.axis), None
    return module.grouped(weight), module.group_size


def _unpackable(layer: Layer, module: GridWeight) -> str:
    if KINDS[layer.kind].name != "linear":
        return f"{'an' if layer.kind[0] in 'aeiou' else 'a'} {layer.kind} layer (pack-quantized holds nn.Linear weights)"
    if module.method != "linear":
        return f"a {module.method} grid (pack-quantized holds linear integer grids)"
    if module.bits > 8:
        return f"bits={module.bits} (pack-quantized packs 1 to 8 bits)"
    if module.axis is None:
        return "a per-tensor grid (quantize with per_channel=True or group_size=N)"
    return ""


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed b-bit integers (rows, cols) packed along cols into int32 words as compressed-tensors
    packs them: offset by 2^(b-1), element i of a row at bits [i*b, i*b + b) of the row's stream."""
    rows, cols = values.shape
    unsigned = (values.to(torch.int64) + (1 << (bits - 1)))
    if bool(((unsigned < 0) | (unsigned >= 1 << bits)).any()):
        raise FormatError(f"pack_int32: values outside the signed {bits}-bit range")
    start = torch.arange(cols, dtype=torch.int64) * bits
    words = math.ceil(cols * bits / 32)
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    word, offset = start // 32, start % 32
    out.scatter_add_(1, word.expand(rows, -1), (unsigned << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32   # an element straddling two words: its high bits open the next one
    out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), unsigned[:, spill] >> (32 - offset[spill]))
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def _packed_tensors(p: PackedLayer) -> dict[str, torch.Tensor]:
    shift = 0 if p.symmetric else 1 << (p.bits - 1)
    name = p.layer.name
    tensors = {f"{name}.weight_packed": pack_int32(p.codes.codes - shift, p.bits),
               f"{name}.weight_scale": p.codes.scale.float().contiguous(),
               f"{name}.weight_shape": torch.tensor(list(p.codes.codes.shape), dtype=torch.int64)}
    if not p.symmetric:
        zero = p.codes.zero_point.round().to(torch.int64) - shift
        tensors[f"{name}.weight_zero_point"] = pack_int32(zero.T, p.bits).T.contiguous()
    return tensors


def _tensors(gm: GraphModule, packed: list[PackedLayer]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint: the model's own parameters and buffers (not masks, quantizers or observers),
    layer weights as computed, packed layers replaced by their packed tensors. A tensor held under
    two names (a tied LM head) is written once, under its first name."""
    masks = {mask_name(l.weight) for l in find_layers(gm) if get_mask(gm, l) is not None}
    ours = tuple(f"{name}." for name, m in gm.named_modules() if isinstance(m, (WeightTransform, ActivationQuant)))
    weights = {l.weight: l for l in find_layers(gm) if l.tied_to is None}
    by_packed = {p.layer.weight: p for p in packed}
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied = []
    for name, tensor in gm.state_dict(keep_vars=True).items():
        if name in masks or name.startswith(ours):
            continue
        if id(tensor) in seen:
            tied.append(name)
            continue
        seen[id(tensor)] = name
        if name in by_packed:
            out.update(_packed_tensors(by_packed[name]))
        elif name in weights:
            out[name] = effective_weight(gm, weights[name]).detach().contiguous().clone()
        else:
            out[name] = tensor.detach().contiguous().clone()
    return out, tied


def quantization_config(packed: list[PackedLayer], ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per (bits, symmetric, group size)."""
    groups: dict[tuple, list[str]] = {}
    for p in packed:
        groups.setdefault((p.bits, p.symmetric, p.group_size), []).append(p.layer.name)
    config_groups = {}
    for i, ((bits, symmetric, group_size), targets) in enumerate(sorted(groups.items(), key=str)):
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
                   "strategy": "group" if group_size is not None else "channel", "group_size": group_size}
        config_groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": QUANT_METHOD, "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "sparsity_config": {}}


def _config_text(data: dict[str, Any]) -> str:
    try:
        return json.dumps(data, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        bad = [key for key, value in data.items() if not _json_ok(value)]
        raise ConfigError(f"to_compressed_tensors: config[{bad[0] if bad else '?'!r}] cannot be written to "
                          f"config.json ({exc}); pass plain JSON values (a transformers config's to_dict() "
                          "holds them)") from exc


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _write_directory(out: Path, tensors: dict[str, torch.Tensor], config_text: str) -> int:
    """Write model.safetensors and config.json into `out`, each to a temporary file renamed into place once
    complete: on any error the temporary files, and the folders this call created, are removed, and files
    already in `out` are left as they were. Returns the size of model.safetensors."""
    try:
        from safetensors.torch import save_file   # optional: only this export needs it
    except ImportError as exc:
        raise MissingDependencyError("to_compressed_tensors needs safetensors: pip install safetensors") from exc
    if out.exists() and not out.is_dir():
        raise ConfigError(f"to_compressed_tensors: {str(out)!r} is a file, not a directory to write the "
                          "checkpoint into")
    created = [parent for parent in (out, *out.parents) if not parent.exists()]
    temporary: list[str] = []
    done = False
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"to_compressed_tensors: cannot create the directory {str(out)!r}: {exc}") from exc
        weights = _temporary(out, "model.safetensors", temporary)
        save_file(tensors, weights, metadata={"format": "pt"})
        config = _temporary(out, "config.json", temporary)
        with open(config, "w") as f:
            f.write(config_text)
        for path, name in ((weights, "model.safetensors"), (config, "config.json")):
            os.replace(path, out / name)
        done = True
        return (out / "model.safetensors").stat().st_size
    finally:
        if not done:
            for path in temporary:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            for folder in created:  # innermost first; only the folders this call made, and only if empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _temporary(out: Path, name: str, temporary: list[str]) -> str:
    """A new temporary file beside `out / name`, with the mode a plain new file gets (mkstemp's is 0600,
    which a model server run as another user could not read)."""
    try:
        fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
    except OSError as exc:
        raise ConfigError(f"to_compressed_tensors: cannot write into {str(out)!r}: {exc}") from exc
    temporary.append(path)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return path
