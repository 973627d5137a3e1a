"""The shared training loop: deterministic, learns, runs the step hook, takes a custom loss, and optimizes
with torch's SGD / Adam / AdamW, weight decay and a constant, step or cosine learning-rate schedule."""
import copy
import io
import math
import re
import sys

import pytest
import torch
from torch import nn

import fxcompress

from fxcompress.datasets import load_dataset
from fxcompress.errors import ConfigError
from fxcompress.passes import PruneChannels
from fxcompress.training import OptimizerConfig, evaluate, torch_threads, train
from fxcompress.zoo import LeNet300100


def fresh_model():
    torch.manual_seed(0)
    return LeNet300100(64, 10)


def test_training_learns_digits_and_is_deterministic():
    data = load_dataset("digits")
    a, b = fresh_model(), fresh_model()
    losses = train(a, data, epochs=3, seed=1)
    train(b, data, epochs=3, seed=1)
    assert losses[-1] < losses[0]
    assert evaluate(a, data.test_x, data.test_y) > 0.85
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_step_hook_runs_after_every_step_and_custom_loss_is_used():
    x, y = torch.randn(50, 64), torch.randint(0, 10, (50,))
    steps, seen = [], []

    def loss(logits, targets, inputs):
        seen.append(inputs.shape[0])
        return nn.functional.cross_entropy(logits, targets)

    train(fresh_model(), (x, y), epochs=2, batch_size=20, step_hook=steps.append, loss=loss)
    assert steps == [1, 2, 3, 4, 5, 6]
    assert seen == [20, 20, 10] * 2


def test_evaluate_restores_training_mode():
    model = fresh_model().train()
    acc = evaluate(model, torch.randn(5, 64), torch.zeros(5, dtype=torch.long))
    assert 0.0 <= acc <= 1.0 and model.training


@pytest.mark.parametrize("kwargs, field", [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"),
                                          ({"batch_size": 0}, "batch_size")])
def test_bad_options_raise(kwargs, field):
    args = {"epochs": 1, **kwargs}
    with pytest.raises(ConfigError, match=f"train.{field}"):
        train(fresh_model(), (torch.randn(4, 64), torch.zeros(4, dtype=torch.long)), **args)


def test_torch_threads_restores_the_setting():
    from fxcompress.training import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


class Terminal(io.StringIO):
    """A stderr that says it is a terminal: tqdm draws its bars there (it draws none into a pipe)."""

    def isatty(self):
        return True


def _terminal(monkeypatch) -> Terminal:
    """Set in the test itself: pytest puts its own stderr back between a fixture's setup and the test."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_train_shows_epochs_and_loss_on_a_terminal_and_trains_the_same(monkeypatch):
    terminal = _terminal(monkeypatch)
    x, y = torch.randn(50, 64), torch.randint(0, 10, (50,))
    torch.manual_seed(0)
    quiet_model = fresh_model()
    loud_model = copy.deepcopy(quiet_model)
    quiet = train(quiet_model, (x, y), epochs=2, batch_size=20)
    assert terminal.getvalue() == ""  # progress is off unless asked for
    loud = train(loud_model, (x, y), epochs=2, batch_size=20, progress=True)
    shown = terminal.getvalue()
    assert "train epoch 2/2" in shown and f"loss={loud[0]:.4f}" in shown and "6/6" in shown
    assert quiet == loud and all(torch.equal(a, b) for a, b in zip(quiet_model.parameters(), loud_model.parameters()))


def test_progress_is_off_where_the_output_is_not_a_terminal(monkeypatch):
    pipe = io.StringIO()  # isatty() is False
    monkeypatch.setattr(sys, "stderr", pipe)
    train(fresh_model(), (torch.randn(8, 64), torch.zeros(8, dtype=torch.long)), epochs=1, progress=True)
    assert pipe.getvalue() == ""


def test_reconstruction_and_sensitivity_sweeps_show_progress(monkeypatch):
    terminal = _terminal(monkeypatch)
    x = torch.randn(64, 64)
    model = fresh_model().eval()
    fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=True)], example_inputs=(x[:2],),
                       calibration_data=[x], progress=True)
    capture, _, refit = terminal.getvalue().partition("reconstruct:")
    assert "capture features" in capture and all(f"layer/s, {name}]" in refit for name in ("fc2", "fc3"))
    labels = model(x).argmax(1)
    fxcompress.sensitivity(model, lambda m: (m(x).argmax(1) == labels).float().mean().item(), [0.5, 0.9],
                           progress=True)
    assert "sensitivity" in terminal.getvalue() and "fc3 at 0.9" in terminal.getvalue()


def _by_hand(model, x, y, epochs, batch_size, seed, make_optimizer, make_scheduler):
    """The same loop written out with torch's classes: the reference the options must reproduce."""
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return model


@pytest.mark.parametrize("config, make_optimizer, make_scheduler", [
    (OptimizerConfig(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="step",
                     step_epochs=2, gamma=0.5),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2 * 4, gamma=0.5)),  # 4 batches an epoch
    (OptimizerConfig(optimizer="adamw", weight_decay=0.05, schedule="cosine"),
     lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.05),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3 * 4)),
    (OptimizerConfig(optimizer="sgd"), lambda p: torch.optim.SGD(p, lr=0.05), lambda o: None),
])
def test_the_optimizer_weight_decay_and_schedule_are_torchs(config, make_optimizer, make_scheduler):
    x, y = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.arange(50) % 10
    ours, theirs = fresh_model(), fresh_model()
    train(ours, (x, y), 3, lr=0.05, batch_size=13, seed=4, optimizer=config)
    _by_hand(theirs, x, y, 3, 13, 4, make_optimizer, make_scheduler)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    adam = fresh_model()
    train(adam, (x, y), 3, lr=0.05, batch_size=13, seed=4)
    assert not torch.equal(adam.fc1.weight, ours.fc1.weight)  # the choice changed the result


def test_a_cosine_schedule_ends_at_zero_and_a_step_schedule_decays(monkeypatch):
    rates = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"])
                        or real_step(self, *a, **k))
    x, y = torch.randn(40, 1, 8, 8), torch.arange(40) % 10
    train(fresh_model(), (x, y), 2, lr=0.1, batch_size=10, optimizer=OptimizerConfig(optimizer="sgd",
                                                                                      schedule="cosine"))
    assert rates[0] == 0.1 and rates[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * 7 / 8)) / 2)
    rates.clear()
    train(fresh_model(), (x, y), 3, lr=0.1, batch_size=10, optimizer=OptimizerConfig(
        optimizer="sgd", schedule="step", step_epochs=1, gamma=0.5))
    assert rates == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "rmsprop"}, "OptimizerConfig.optimizer must be one of 'sgd', 'adam', 'adamw'"),
    ({"momentum": 0.9}, "OptimizerConfig.momentum=0.9 does not apply to optimizer 'adam'"),
    ({"optimizer": "adamw", "nesterov": True}, "OptimizerConfig.nesterov=True does not apply"),
    ({"optimizer": "sgd", "nesterov": True}, "nesterov=True needs OptimizerConfig.momentum > 0"),
    ({"gamma": 0.5}, "OptimizerConfig.gamma=0.5 does not apply to schedule 'constant'"),
    ({"schedule": "cosine", "step_epochs": 3}, "OptimizerConfig.step_epochs=3 does not apply"),
    ({"schedule": "linear"}, "OptimizerConfig.schedule must be one of"),
    ({"weight_decay": -1.0}, "OptimizerConfig.weight_decay"),
    ({"momentum": 1.5, "optimizer": "sgd"}, "OptimizerConfig.momentum"),
])
def test_bad_optimizer_options_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        OptimizerConfig(**kwargs)
    with pytest.raises(ConfigError, match="train.optimizer must be"):
        train(fresh_model(), (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 1, optimizer="sgd")


@pytest.mark.parametrize("count", [0, -2, 1.5])
def test_torch_threads_refuses_a_count_that_is_not_positive(count):
    before = torch.get_num_threads()
    with pytest.raises(ConfigError, match=r"torch_threads.count must be"):
        with torch_threads(count):
            pytest.fail("the block ran")
    assert torch.get_num_threads() == before
