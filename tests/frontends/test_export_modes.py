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


class Wrapped(nn.Module):
    """One module between two other ops: the module's call is the graph's middle."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, x):
        return self.inner(x * 2) + 1


# nn.Dropout1d / 2d / 3d export as aten.feature_dropout, the alpha ones as aten.(feature_)alpha_dropout: each case's
# input shape (batched and unbatched, as the module takes them)
FEATURE_AND_ALPHA_DROPOUTS = {
    "Dropout1d": (nn.Dropout1d, (8, 6, 5)), "Dropout1d-unbatched": (nn.Dropout1d, (6, 5)),
    "Dropout2d": (nn.Dropout2d, (8, 6, 4, 4)), "Dropout3d": (nn.Dropout3d, (8, 6, 2, 3, 3)),
    "Dropout3d-unbatched": (nn.Dropout3d, (6, 2, 3, 3)), "AlphaDropout": (nn.AlphaDropout, (8, 6, 5)),
    "FeatureAlphaDropout": (nn.FeatureAlphaDropout, (8, 6, 4, 4)),
}


@pytest.mark.parametrize("compiled_in", ["train", "eval"])
@pytest.mark.parametrize("case", FEATURE_AND_ALPHA_DROPOUTS)
def test_feature_and_alpha_dropouts_switch_with_train_and_eval_as_in_the_model(case, compiled_in):
    kind, shape = FEATURE_AND_ALPHA_DROPOUTS[case]
    torch.manual_seed(0)
    model, x = getattr(Wrapped(kind(0.5)), compiled_in)(), torch.randn(*shape)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert type(gm.inner) is kind and gm.inner.p == 0.5 and gm.training == model.training
    assert not [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]  # no aten op left
    for mode in ("eval", "train", "eval"):
        getattr(gm, mode)()
        getattr(model, mode)()
        first, second = _same_draws(gm, x, seed=1), _same_draws(gm, x, seed=2)
        assert torch.equal(first, _same_draws(model, x, seed=1)) and torch.equal(second, _same_draws(model, x, seed=2))
        assert torch.equal(first, second) == (mode == "eval"), mode  # eval: the same whatever the draws
        if mode == "eval":
            assert torch.equal(first, x * 2 + 1)  # an identity


class Unbatched2d(nn.Module):
    """nn.Dropout2d over a 3-dim input drops whole rows, as nn.Dropout1d: torch's own reading, with a warning."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.5)

    def forward(self, x):
        return self.drop(x) * 2


def test_a_dropout2d_over_three_dims_becomes_the_module_that_drops_as_it_does():
    torch.manual_seed(0)
    model, x = Unbatched2d().train(), torch.randn(4, 6, 5)
    with pytest.warns(UserWarning, match="dropout2d: Received a 3D input"):
        gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert type(gm.drop) is nn.Dropout1d  # what nn.Dropout2d computes there, without its warning at each call
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        getattr(model, mode)()
        with pytest.warns(UserWarning, match="dropout2d"):
            expected = _same_draws(model, x)
        assert torch.equal(_same_draws(gm, x), expected)


class Cumulative(nn.Module):
    """A BatchNorm with momentum=None: its running statistics are the plain average over the batches seen."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None)

    def forward(self, x):
        return self.bn(self.fc(x)) * 2


@pytest.mark.parametrize("compiled_in", ["train", "eval"])
def test_a_cumulative_batch_norm_averages_as_the_models_in_both_modes(compiled_in):
    torch.manual_seed(0)
    model = getattr(Cumulative(), compiled_in)()
    gm = fxcompress.compile(model, [], (torch.randn(4, 8),), frontend="export")  # train: export fails without help
    assert type(gm.bn) is nn.BatchNorm1d and gm.bn.momentum is None and model.bn.momentum is None
    gm.train()
    model.train()
    for step in range(4):
        x = torch.randn(6, 8) * (step + 1) + step  # statistics that move, so an average of the wrong kind shows
        assert torch.equal(_same_draws(gm, x), _same_draws(model, x))
    assert int(gm.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 4
    for name in ("running_mean", "running_var"):  # 1/n weights, not an exponential average nor none (momentum 0)
        torch.testing.assert_close(getattr(gm.bn, name), getattr(model.bn, name), rtol=0, atol=1e-6)
    gm.eval()
    model.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(_same_draws(gm, x), _same_draws(model, x), rtol=0, atol=1e-6)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None)

    def forward(self, x):
        return self.bn(self.bn(self.fc(x)))


def test_a_cumulative_batch_norm_that_cannot_become_its_module_is_refused_by_name():
    """Its call reads statistics read twice: no module takes it back, and the exported momentum would be wrong."""
    with pytest.raises(fxcompress.errors.TraceError, match=r"BatchNorm 'bn' with momentum=None \(a cumulative "
                                                           r"average\) in training mode"):
        fxcompress.compile(CalledTwice().train(), [], (torch.randn(4, 8),), frontend="export")


class Mixed(nn.Module):
    """A BatchNorm, a Dropout2d and a dropout following the module's flag, as a program holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout2d(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(F.dropout(h.flatten(1), 0.3, training=self.training))


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("exported_in", ["train", "eval", "frozen statistics"])
def test_a_program_given_alone_comes_back_in_its_export_mode_and_switches_as_the_model(exported_in):
    """torch.export keeps dropout in an eval-mode program (its flag False): the program given alone says nothing
    of the model's mode but what its calls hold. It comes back in that mode, and train() / eval() switch it as
    they switch the model; model.train() then bn.eval() (frozen statistics) comes back so too."""
    model, x = _mixed(), torch.randn(4, 3, 8, 8)
    model.train(exported_in != "eval")
    if exported_in == "frozen statistics":
        model.bn.eval()
    program = torch.export.export(model, (x,))
    assert any(n.target == torch.ops.aten.dropout.default for n in program.graph.nodes)  # in eval mode too
    gm = fxcompress.compile(program, [], (x,))
    assert gm.training == model.training and gm.bn.training == model.bn.training
    assert {type(m) for m in gm.modules()} >= {nn.BatchNorm2d, nn.Dropout2d, nn.Dropout}
    reference = copy.deepcopy(model)
    for mode in ("as exported", "eval", "train", "eval"):
        if mode != "as exported":
            getattr(gm, mode)()
            getattr(reference, mode)()
        first, second = _same_draws(gm, x, seed=1), _same_draws(gm, x, seed=2)  # each call updates statistics
        assert torch.equal(first, _same_draws(reference, x, seed=1)), mode
        assert torch.equal(second, _same_draws(reference, x, seed=2)), mode
        assert torch.equal(first, second) == (not reference.training), mode


class AlwaysDropsBeside(nn.Module):
    """F.dropout's default (training=True, always) beside an nn.Dropout following the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(self.drop(self.fc(x)), 0.5)


def test_a_program_given_alone_keeps_a_dropout_fixed_against_its_modules_mode():
    torch.manual_seed(0)
    model, x = AlwaysDropsBeside().eval(), torch.randn(4, 8)
    gm = fxcompress.compile(torch.export.export(model, (x,)), [], (x,))
    assert gm.training is False and [type(m) for m in gm.modules()].count(nn.Dropout) == 1  # the module's own
    for mode in ("eval", "train", "eval"):
        getattr(gm, mode)()
        getattr(model, mode)()
        assert torch.equal(_same_draws(gm, x), _same_draws(model, x)), mode


def test_a_cumulative_batch_norm_in_an_eval_program_given_alone_keeps_momentum_zero_with_a_warning():
    """What the graph cannot tell: eval mode writes momentum None as 0.0, the same as a momentum of 0.0."""
    torch.manual_seed(0)
    model, x = Cumulative().eval(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match=r"BatchNorm 'bn' was exported in eval mode with momentum 0.0, as "
                                         r"torch.export writes momentum=None .* too"):
        gm = fxcompress.compile(torch.export.export(model, (x,)), [], (x,))
    assert gm.bn.momentum == 0.0 and gm.training is False
    assert torch.equal(_same_draws(gm, x), _same_draws(model, x))
    gm.train()
    _same_draws(gm, x * 3 + 1)
    assert torch.equal(gm.bn.running_mean, model.bn.running_mean)  # unchanged, as documented


def test_a_program_with_no_dropout_nor_batch_norm_keeps_the_modules_default_mode():
    x = torch.randn(4, 8)
    gm = fxcompress.compile(torch.export.export(nn.Linear(8, 8).eval(), (x,)), [], (x,))
    assert gm.training is True  # nothing in the graph depends on it, nor says what it was
