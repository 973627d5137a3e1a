"""Calibration batches as users give them: a list (a generator listed where a pass reads it twice), each
batch a tensor, a tuple of the graph's inputs, or a dict bound to them by name (a tokenizer's output); and
their padded positions, the zeros of an `attention_mask` input, which no statistic should read. One home
for these rules, read by the calibration walk (fxcompress.calibration) and by activation calibration
(fxcompress.quant.calibrate), so both accept and refuse the same batches in the same words."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import Node

from .errors import PreconditionError

# The graph input whose zeros mark padded positions (transformers' name): those tokens are left out of every
# statistic, as GPTQ / llm-compressor leave them out, since a pad token's activations are no text the model reads.
TOKEN_MASK = "attention_mask"


class PaddingIncludedWarning(UserWarning):
    """Calibration batches carry padding (zeros in the attention mask), but a layer's input rows do not line
    up with the mask's positions (experts reading routed tokens, a reshaped value): its statistics include
    the padded positions."""


def token_rows(value: Any, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The rows (..., channels) of `value` at unpadded positions, flattened: all of them when `keep` is None,
    None when the rows do not line up with `keep`'s positions (batch, sequence): neither the same leading
    shape nor one row per position in order (a (batch * sequence, channels) value, as addmm reads)."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value if keep is None else None
    if keep is None:
        return value.reshape(-1, value.shape[-1])
    if tuple(value.shape[:-1]) == tuple(keep.shape):
        return value[keep]
    if value.ndim == 2 and value.shape[0] == keep.numel():
        return value[keep.reshape(-1)]
    return None


def token_mask(value: Any) -> torch.Tensor | None:
    """A batch's kept positions from its attention-mask input: a (batch, sequence) tensor whose zeros are
    padding; None when there is none to leave out (no mask, all ones, or another form such as a 4-D
    additive mask, whose positions are not tokens)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.is_complex():
        return None
    keep = value != 0
    return None if bool(keep.all()) else keep


def batch_keep(nodes: Sequence[Node], inputs: Sequence) -> torch.Tensor | None:
    """A batch's kept positions from its positional graph inputs: the value of the graph's `attention_mask`
    placeholder among `nodes` (its default where the batch stops short of it, as the graph itself would take
    it), as `token_mask` reads it; None when the graph has no such input or nothing is padded."""
    placeholders = [node for node in nodes if node.op == "placeholder"]
    at = next((i for i, node in enumerate(placeholders) if node.target == TOKEN_MASK), None)
    if at is None:
        return None
    return token_mask(inputs[at] if at < len(inputs) else placeholders[at].args[0] if placeholders[at].args else None)


def bind_inputs(nodes: Sequence[Node], batch: Mapping, index: int) -> tuple:
    """A dict batch as positional inputs in the order of the placeholders among `nodes` (a tokenizer's output
    passed as gm(**batch)); a placeholder it leaves out takes its default, and a key no placeholder has is
    refused (a misspelled attention_mask would otherwise be dropped, and its padding computed with). The
    one binding of calibration: the walk and activation calibration accept and refuse the same batches."""
    placeholders = [node for node in nodes if node.op == "placeholder"]
    names = [node.target for node in placeholders]
    unknown = [key for key in batch if key not in names]
    if unknown:
        hint = (f"; to leave padding out of the statistics, trace the model with its {TOKEN_MASK} among the "
                f"example inputs" if TOKEN_MASK in unknown else "")
        raise PreconditionError(f"calibration batch {index}: the graph has no input named "
                                f"{', '.join(map(repr, unknown))}; its inputs are {names}{hint}")
    inputs = []
    for node in placeholders:
        if node.target in batch:
            inputs.append(batch[node.target])
        elif node.args:
            inputs.append(node.args[0])
        else:
            raise PreconditionError(f"calibration batch {index}: no value for the graph input {node.target!r} "
                                    f"(the batch holds {sorted(batch)}), which has no default")
    return tuple(inputs)


def calibration_batches(data: Sequence | None, owner: str) -> list:
    """compile's calibration_data as a list: a caller that walks it twice must list it once (a generator is
    used up by the first walk)."""
    if data is None:
        raise PreconditionError(f"{owner} needs calibration data: pass compile(..., calibration_data=batches)")
    if isinstance(data, Mapping):  # iterating it would make each key a batch
        raise PreconditionError(f"{owner}: calibration_data is one dict; pass a list of batches ([batch])")
    batches = list(data)
    if not batches:
        raise PreconditionError(f"{owner}: calibration_data yielded no batch (a generator is used up after one "
                                f"pass: pass a list)")
    return batches
