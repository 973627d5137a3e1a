"""A plain, deterministic training loop and an accuracy metric, shared by examples and benchmarks.

Nothing here knows about compression: masks and fake-quant live in the graph, so any loop trains a
compressed GraphModule correctly. `step_hook(step)` runs after every optimizer step (schedules
such as gradual pruning hook in there); `loss(logits, targets, inputs)` replaces cross-entropy
(e.g. a distillation loss that needs the inputs to query a teacher).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_int, check_real
from .execution import evaluating

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _split(data) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset's training split, or an (inputs, targets) pair as given."""
    if hasattr(data, "train_x"):
        return data.train_x, data.train_y
    inputs, targets = data
    return inputs, targets


def train(model: nn.Module, data, epochs: int, *, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
          step_hook: Callable[[int], None] | None = None, loss: Loss | None = None) -> list[float]:
    """Train `model` with Adam on `data` (a Dataset or an (x, y) pair); returns the mean loss per epoch.

    The batch order depends only on `seed`, so two runs from the same weights give the same model.
    The model is left in eval mode.
    """
    check_int("train", "epochs", epochs, lo=0)
    check_real("train", "lr", lr, lo=0.0, lo_open=True)
    check_int("train", "batch_size", batch_size, lo=1)
    inputs, targets = _split(data)
    loss = loss or _cross_entropy
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history, step = [], 0
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            x, y = inputs[batch], targets[batch]
            optimizer.zero_grad(set_to_none=True)
            value = loss(model(x), y, x)
            value.backward()
            optimizer.step()
            step += 1
            if step_hook is not None:
                step_hook(step)
            total += value.item() * len(batch)
        history.append(total / max(len(inputs), 1))
    model.eval()
    return history


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of `model` on `x`, in eval mode and without grad, batch by batch."""
    with evaluating(model):
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y), in [0, 1]."""
    if len(x) == 0:
        return 0.0
    return (predict(model, x, batch_size).argmax(dim=1) == y).float().mean().item()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads (small models train fastest on one), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
