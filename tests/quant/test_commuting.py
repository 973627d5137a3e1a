import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.quant.commuting import COMMUTING_FUNCTIONS, COMMUTING_METHODS, COMMUTING_MODULES


def _round_to_grid(x, step=0.37, zero=0):
    return (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step


CALLS = {F.relu: F.relu, torch.relu: torch.relu, F.max_pool1d: lambda x: F.max_pool1d(x.flatten(2), 2),
         F.max_pool2d: lambda x: F.max_pool2d(x, 2), F.max_pool3d: lambda x: F.max_pool3d(x.unsqueeze(1), 2),
         torch.flatten: lambda x: torch.flatten(x, 1), torch.reshape: lambda x: torch.reshape(x, (2, -1)),
         F.dropout: lambda x: F.dropout(x, 0.5, training=False), operator.getitem: lambda x: x[:, 1:, ::2]}


def test_every_commuting_op_gives_the_same_codes_before_or_after_rounding():
    """The table's claim, op by op: rounding onto a grid holding 0 exactly, then the op, equals the op, then
    rounding (asymmetric grids included: zero point 7)."""
    assert set(CALLS) == COMMUTING_FUNCTIONS
    methods = {"relu": lambda x: x.relu(), "flatten": lambda x: x.flatten(1), "view": lambda x: x.view(2, -1),
               "reshape": lambda x: x.reshape(-1)}
    assert set(methods) == COMMUTING_METHODS
    modules = [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3).eval(), nn.Identity(),
               lambda x: nn.MaxPool1d(2)(x.flatten(2)), lambda x: nn.MaxPool3d(2)(x.unsqueeze(1))]
    assert {type(m) for m in modules if isinstance(m, nn.Module)} | {nn.MaxPool1d, nn.MaxPool3d} == \
        set(COMMUTING_MODULES)
    x = torch.randn(2, 4, 6, 6) * 3
    for zero in (0, 7):
        for op in [*CALLS.values(), *methods.values(), *modules]:
            assert torch.equal(op(_round_to_grid(x, zero=zero)), _round_to_grid(op(x), zero=zero))
