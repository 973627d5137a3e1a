"""The value check of an int8 QDQ file: ONNX Runtime's outputs against those of the QDQ module the file was exported
from (`qdq.quantize_dequantize`), within a bound stated in steps of the model's last activation grids.

Why the two may differ at all: ORT's int8 kernels read the same codes as our module and accumulate them exactly in
int32, where our module sums the dequantized values in float32 (a relative error of about 1e-7 of the terms); ORT
then requantizes by multiplying the accumulator by s_in * s_w / s_out in float32 and rounding half to even, where
our module divides the float sum by s_out. The two roundings agree except for a value within float32 error of a
rounding tie, where a code may move by one. An audit found ORT within about 1e-7 of the module on many models, with
a code moved at a tie in at most about one row in a hundred (the digits models).

The bound, per output element y: FLOAT_TOLERANCE (relative to the output's size, as the float export's check) for
the float arithmetic, plus one step of each last activation grid y is computed from (a grid with no other grid
between it and y) carried through what follows it:

    |ORT(y) - ours(y)| <= tol + sum over last-grid values v of |dy/dv| * step(v)

where dy/dv is taken by autograd on the module with each grid's output a leaf. Where y is a grid's output itself
(a quantized output) that is one step of its grid; where a layer follows the grid (float logits) it is the change
of y if every one of its input codes moved by one step at once, exact for the affine layers that follow a last
grid (for a nonlinear tail, its first-order value). A code moved at a tie moves by one; what it moves in later
layers is |w| times one step of its grid, which moves a later grid's code by at most one where the moves it
adds up are below that grid's step (in practice: a later grid spans a layer's outputs): so each last-grid code is off by at most one, and the bound lets every
one of them be off at once, room that a rare tie never fills (480 batches of each digits model, 8- and 7-bit
activations, passed). A wrong file (a weight of the other sign, a scale 10% off) moves the outputs by many
steps: refused. What the bound cannot tell from a tie is a scale a few percent off.

Costs: the bound is computed only where the difference passes the float tolerance, for the MAX_BOUNDED largest
differences of each output (one backward through what follows the last grids for each); a wrong file's largest
differences are the ones out of bounds. Integer outputs (an argmax of logits, which a code moved at a tie may
change) are compared by shape only."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..kernels import native
from .qdq import Dequantize, QuantizeDequantize

# the float export's tolerance (runtime_check.RUNTIME_TOLERANCE), relative to the output's size (at least 1): float32
# sums of the dequantized values against ORT's exact int32 sums scaled once are far below it
FLOAT_TOLERANCE = 1e-3
# how many of an output's elements beyond the float tolerance get a bound of their own (the largest differences)
MAX_BOUNDED = 64


def out_of_bounds(module: nn.Module, inputs: tuple, got: list[np.ndarray], expected: list[torch.Tensor]
                  ) -> tuple[int, str] | None:
    """The first output (its index and a description) whose ORT values `got` leave the grid bound around the QDQ
    module's `expected` on `inputs`; None if every one is within it."""
    flagged = {}
    for k, (value, reference) in enumerate(zip(got, expected)):
        if not reference.is_floating_point() or reference.numel() == 0:
            continue  # an integer output: a code moved at a tie may change it rightly
        excess = _beyond_float(value, reference)
        if isinstance(excess, str):
            return k, excess
        if excess is not None:
            flagged[k] = excess
    if not flagged:
        return None
    outputs, leaves = _with_grid_leaves(module, inputs)
    for k, (difference, tolerance) in flagged.items():
        found = _beyond_grid(outputs[k], leaves, difference, tolerance)
        if found is not None:
            return k, found
    return None


def _beyond_float(value: np.ndarray, reference: torch.Tensor) -> tuple[np.ndarray, float] | str | None:
    """None where ORT's values are the module's within the float tolerance (and its NaN and infinities where they
    are not finite); a description where they are not finite where the module's are, or the reverse; else each
    element's difference (0 where within the float tolerance) and the tolerance."""
    expected, value = reference.detach().double().cpu().numpy(), value.astype(np.float64)
    finite = np.isfinite(expected)
    if not np.array_equal(expected[~finite], value[~finite], equal_nan=True) or not np.isfinite(value[finite]).all():
        return "with non-finite values where the QDQ graph's are finite, or finite ones where they are not"
    tolerance = FLOAT_TOLERANCE * max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 0.0
    difference = np.where(finite, np.abs(value - np.where(finite, expected, 0.0)), 0.0)
    return None if difference.max() <= tolerance else (np.where(difference > tolerance, difference, 0.0), tolerance)


def _with_grid_leaves(module: nn.Module, inputs: tuple) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, float]]]:
    """The module's tensor outputs on `inputs` with every activation grid's output an autograd leaf (each with its
    step): a gradient of an output stops at the last grids it is computed from."""
    leaves: list[tuple[torch.Tensor, float]] = []

    def leaf(grid: QuantizeDequantize, _args, output: torch.Tensor) -> torch.Tensor:
        value = output.detach().requires_grad_()
        leaves.append((value, float(grid.scale)))
        return value.clone()  # not the leaf itself: an in-place op after a grid (ReLU(inplace=True)) may write it

    hooks = [m.register_forward_hook(leaf) for m in module.modules() if isinstance(m, QuantizeDequantize)]
    try:
        with torch.enable_grad():
            outputs = [t for t in tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, leaves


def _beyond_grid(output: torch.Tensor, leaves: list[tuple[torch.Tensor, float]], difference: np.ndarray,
                 tolerance: float) -> str | None:
    """A description of the largest difference out of its grid bound among the MAX_BOUNDED largest, or None."""
    flat = difference.reshape(-1)
    order = np.argsort(flat)[::-1][:MAX_BOUNDED]
    order = order[flat[order] > 0]
    reached = [v for v, _ in leaves]
    for index in order:
        bound = tolerance
        if output.requires_grad:  # else no grid reaches it: a float path, held to the float tolerance alone
            grads = torch.autograd.grad(output.reshape(-1)[int(index)], reached, retain_graph=True,
                                        allow_unused=True)
            bound += sum(float(g.abs().sum()) * step for g, (_, step) in zip(grads, leaves) if g is not None)
        if flat[index] > bound:
            position = tuple(int(i) for i in np.unravel_index(int(index), difference.shape))
            return (f"at {position} by {flat[index]:.4g}, beyond one step of its last activation grids "
                    f"carried to it plus the float tolerance ({bound:.4g})")
    return None


def saturation_hint(module: nn.Module) -> str:
    """Where this CPU has no VNNI and a layer's weight codes times the largest activation code can pass int16 (ORT's
    uint8 x int8 kernels add pairs of products in int16 there, saturating): what to do; else ''."""
    if native.vnni():
        return ""
    spans = [grid.qmax - grid.qmin for grid in module.modules() if isinstance(grid, QuantizeDequantize)]
    if not spans:
        return ""
    # ORT runs int8 activations as uint8 codes (shifted by 128): a grid's codes reach its span either way
    widest = max(spans)
    saturating = [name for name, m in module.named_modules() if isinstance(m, Dequantize)
                  and m.codes.dtype == torch.int8 and m.codes.ndim >= 2
                  and not native.saturation_free(m.codes, widest)]
    if not saturating:
        return ""
    return (f"; this CPU has no VNNI, where ONNX Runtime's uint8 x int8 kernels add pairs of products in int16 and "
            f"saturate with 8-bit weights and 8-bit activations (weight codes of {saturating[0]!r} times activation "
            f"code {widest} can pass 32767): quantize activations to 7 bits (InsertFakeQuant(..., "
            "activations=ActivationConfig(bits=7)), as torch.ao's x86 reduce_range does) and export again")
