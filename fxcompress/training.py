"""A plain, deterministic training loop and an accuracy metric, shared by examples and benchmarks.

Nothing here knows about compression: masks and fake-quant live in the graph, so any loop trains a
compressed GraphModule correctly. `step_hook(step)` runs after every optimizer step (schedules
such as gradual pruning hook in there); `loss(logits, targets, inputs)` replaces cross-entropy
(e.g. a distillation loss that needs the inputs to query a teacher).

Data-parallel fine-tuning wraps the compressed GraphModule in DistributedDataParallel and trains
each rank on `shard(data)`; `check_replicas(model)` then proves the ranks still hold bitwise
identical parameters and buffers (shared centroids, masks, observer statistics).
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import Boolean, Interval, Options, TypeOf, check, check_applicable, check_int, check_real, validate
from .errors import ConfigError, PreconditionError, VerificationError
from .execution import evaluating

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# optimizer name -> torch's class; each is built with lr, weight_decay and the options it reads
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                                      "adamw": torch.optim.AdamW}
SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """What `train` optimizes with: torch's SGD (momentum, Nesterov), Adam or AdamW, a weight decay, and a
    learning-rate schedule over the run — constant, step (the rate times `gamma` every `step_epochs`
    epochs) or cosine (from lr down to 0 at the last optimizer step, torch's CosineAnnealingLR).

    Every run of `train` starts a fresh optimizer and schedule, so a model saved after a run holds all
    the state the next run needs (a resumed recipe ends where an uninterrupted one does). A field the
    chosen optimizer or schedule does not read is refused rather than ignored (momentum with adam)."""

    optimizer: str = "adam"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_epochs: int = 1
    gamma: float = 0.1
    constraints: ClassVar[dict] = {"optimizer": (Options(*OPTIMIZERS),), "momentum": (Interval(float, 0.0, 1.0),),
                                   "nesterov": (Boolean(),), "weight_decay": (Interval(float, 0.0),),
                                   "schedule": (Options(*SCHEDULES),), "step_epochs": (Interval(int, 1),),
                                   "gamma": (Interval(float, 0.0, 1.0, lo_open=True),)}

    def __post_init__(self) -> None:
        validate(self)
        check_applicable("OptimizerConfig", self, {"momentum": ("sgd",), "nesterov": ("sgd",)},
                         (self.optimizer,), "optimizer")
        check_applicable("OptimizerConfig", self, {"step_epochs": ("step",), "gamma": ("step",)},
                         (self.schedule,), "schedule")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("OptimizerConfig.nesterov=True needs OptimizerConfig.momentum > 0 (torch's SGD)")

    def build(self, parameters: list[nn.Parameter], lr: float, steps_per_epoch: int, epochs: int):
        """(optimizer, scheduler or None); the scheduler advances once per optimizer step."""
        options = {"momentum": self.momentum, "nesterov": self.nesterov} if self.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[self.optimizer](parameters, lr=lr, weight_decay=self.weight_decay, **options)
        if self.schedule == "step":
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, self.step_epochs * steps_per_epoch,
                                                              self.gamma)
        if self.schedule == "cosine":
            return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                                         max(epochs * steps_per_epoch, 1))
        return optimizer, None


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _split(data) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset's training split, or an (inputs, targets) pair as given."""
    if hasattr(data, "train_x"):
        return data.train_x, data.train_y
    inputs, targets = data
    return inputs, targets


def shard(data, rank: int | None = None, world_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a training split (a Dataset or an (x, y) pair) for data-parallel training.

    Rank r takes examples r, r + world_size, ...; the tail that does not divide evenly is dropped,
    so every rank runs the same number of steps (a rank with one step more would wait forever in
    DistributedDataParallel's gradient reduction). `rank` / `world_size` default to torch.distributed's.
    """
    if rank is None or world_size is None:
        running = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if running else 0
        world_size = dist.get_world_size() if running else 1
    check_int("shard", "world_size", world_size, lo=1)
    if not 0 <= rank < world_size:
        raise ConfigError(f"shard.rank must be in [0, {world_size}), got {rank!r}")
    inputs, targets = _split(data)
    length = len(inputs) // world_size
    return inputs[rank::world_size][:length], targets[rank::world_size][:length]


def check_replicas(model: nn.Module) -> int:
    """Raise VerificationError unless every rank holds bitwise the same parameters and buffers.

    A collective: every rank calls it. Compares raw bytes (so -0.0 / 0.0 and NaN payloads count),
    one gather for the whole model; the error names each tensor that differs and the ranks that
    disagree with rank 0. Returns the number of tensors compared.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise PreconditionError("check_replicas: torch.distributed is not initialised (init_process_group first)")
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    layout = [(name, str(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, layout)
    for rank, other in enumerate(layouts):
        if other != layout:
            mismatch = sorted(set(other) ^ set(layout))[:3]
            raise VerificationError(f"check_replicas: rank {rank} holds different tensors than rank "
                                    f"{dist.get_rank()} (name, dtype, shape): {mismatch}")
    raw = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
    mine = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in layouts]
    dist.all_gather(gathered, mine)
    differ, start = [], 0
    for name, part in zip(tensors, raw):
        end = start + part.numel()
        ranks = [r for r, other in enumerate(gathered) if not torch.equal(other[start:end], gathered[0][start:end])]
        if ranks:
            differ.append(f"{name} (ranks {ranks})")
        start = end
    if differ:
        raise VerificationError(f"check_replicas: tensors differ from rank 0: {', '.join(differ)}")
    return len(tensors)


def train(model: nn.Module, data, epochs: int, *, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
          step_hook: Callable[[int], None] | None = None, loss: Loss | None = None,
          progress: bool = False, optimizer: OptimizerConfig | None = None) -> list[float]:
    """Train `model` on `data` (a Dataset or an (x, y) pair); returns the mean loss per epoch.

    `optimizer` names torch's optimizer, weight decay and learning-rate schedule (OptimizerConfig;
    default Adam at a constant `lr`).

    The batch order depends only on `seed`, so two runs from the same weights give the same model.
    The model is left in eval mode. `progress` shows a tqdm bar over the batches (the epoch and the
    last epoch's loss beside it), off where the output is not a terminal.
    """
    check_int("train", "epochs", epochs, lo=0)
    check_real("train", "lr", lr, lo=0.0, lo_open=True)
    check_int("train", "batch_size", batch_size, lo=1)
    check("train", "optimizer", optimizer, TypeOf(OptimizerConfig, what="an OptimizerConfig"), None)
    inputs, targets = _split(data)
    loss = loss or _cross_entropy
    batches = -(-len(inputs) // batch_size)
    optimizer, scheduler = (optimizer or OptimizerConfig()).build(
        [p for p in model.parameters() if p.requires_grad], lr, batches, epochs)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    history, step = [], 0
    with tqdm(total=epochs * batches, desc="train", unit="batch", disable=None if progress else True,
              leave=False) as bar:
        for epoch in range(epochs):
            bar.set_description(f"train epoch {epoch + 1}/{epochs}")
            order = torch.randperm(len(inputs), generator=generator)
            total = 0.0
            for start in range(0, len(inputs), batch_size):
                batch = order[start:start + batch_size]
                x, y = inputs[batch], targets[batch]
                optimizer.zero_grad(set_to_none=True)
                value = loss(model(x), y, x)
                value.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if step_hook is not None:
                    step_hook(step)
                total += value.item() * len(batch)
                bar.update(1)
            history.append(total / max(len(inputs), 1))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
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
    check_int("torch_threads", "count", count, lo=1)  # torch's own refusal of 0 is a bare RuntimeError
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
