"""The shared training loop: deterministic, learns, runs the step hook, takes a custom loss."""
import pytest
import torch
from torch import nn

from fxcompress.datasets import load_dataset
from fxcompress.errors import ConfigError
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
