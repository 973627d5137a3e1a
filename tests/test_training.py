"""The shared training loop: deterministic, learns, runs the step hook, takes a custom loss."""
import copy
import io
import sys

import pytest
import torch
from torch import nn

import fxcompress

from fxcompress.datasets import load_dataset
from fxcompress.errors import ConfigError
from fxcompress.passes import PruneChannels
from fxcompress.training import evaluate, train
from zoo import LeNet300100


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
