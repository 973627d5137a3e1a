"""The export front end's graph follows train() / eval() as the model does: torch.export writes dropout and
batch_norm with the training flag fixed at its value when exported, and the front end puts them back as modules."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress


class Regularized(nn.Module):
    """A BatchNorm, an nn.Dropout, and a dropout written in the forward with the module's own flag."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(F.dropout(h.flatten(1), 0.3, training=self.training))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = Regularized()
    with torch.no_grad():  # statistics of their own, so running and batch statistics differ
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


def _same_draws(module: nn.Module, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("compiled_in", ["train", "eval"])
def test_train_and_eval_switch_the_exported_graph_as_they_switch_the_model(compiled_in):
    model, x = _model(), torch.randn(4, 3, 8, 8)
    getattr(model, compiled_in)()
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert gm.meta["frontend"] == "export" and gm.training == model.training
    reference = copy.deepcopy(model)  # called as gm is: a training-mode call updates the running statistics
    zeroed: list[float] = []  # of each dropout call, the share of its input's nonzero entries it zeroed
    for m in gm.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda m, args, out: zeroed.append((out[args[0] != 0] == 0).float().mean().item()))
    for mode in ("eval", "train", "eval"):  # and back
        getattr(gm, mode)()
        getattr(reference, mode)()
        zeroed.clear()
        first, second = _same_draws(gm, x, seed=1), _same_draws(gm, x, seed=2)
        assert torch.equal(first, _same_draws(reference, x, seed=1))
        assert torch.equal(second, _same_draws(reference, x, seed=2))
        if mode == "eval":  # running statistics, no dropout: the same whatever the draws
            assert torch.equal(first, second) and zeroed == [0.0] * 4
        else:  # batch statistics (equal to the model's), and dropout drawing anew
            assert not torch.equal(first, second)
            assert len(zeroed) == 4 and all(0.2 < z < 0.7 for z in zeroed), zeroed  # both dropouts zero entries
    assert [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"] \
        == ["BatchNorm2d", "Dropout", "Dropout"]


class AlwaysDrops(nn.Module):
    """F.dropout's own default: training=True whatever the module's mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)


def test_a_dropout_fixed_in_training_whatever_the_mode_stays_so():
    torch.manual_seed(0)
    model, x = AlwaysDrops().eval(), torch.randn(4, 8)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    for mode in ("eval", "train"):
        getattr(gm, mode)()
        getattr(model, mode)()
        assert torch.equal(_same_draws(gm, x), _same_draws(model, x))


class OwnStatistics(nn.Module):
    """Batch normalization over statistics of its own, in no BatchNorm module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def forward(self, x):
        return F.batch_norm(self.fc(x), self.mean, self.var, training=self.training)


def test_a_training_mode_batch_norm_no_module_holds_is_named_in_a_warning():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"batch_norm in training mode that is not the call of one BatchNorm module "
                                         r"stays in training mode .* whatever train\(\) / eval\(\) says"):
        fxcompress.compile(OwnStatistics().train(), [], (torch.randn(4, 8),), frontend="export")
