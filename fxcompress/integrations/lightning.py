"""A PyTorch Lightning callback that prunes and quantizes during `Trainer.fit` (the `lightning` extra).

    from fxcompress.integrations.lightning import Compression
    callback = Compression(prune=InsertMasks(sparsity=0.9, schedule=AGP(end=4)), quantize=InsertFakeQuant(bits=5),
                           quantize_epoch=4)
    pl.Trainer(max_epochs=6, callbacks=[callback]).fit(module, data)
    fxcompress.save(module.model, "model.fxc")          # or callback.model

At fit start (the callback's `setup`, before the optimizers exist) the LightningModule's
`attribute` (default `model`) is compiled with `prune`: the masks become graph nodes, and the
module is replaced by the GraphModule, so the optimizers Lightning builds next train it. The
schedule counts epochs (`unit="epoch"`: the masks follow it at every epoch's end, as Lightning's
own ModelPruning prunes there) or optimizer steps (`unit="step"`). At the start of epoch
`quantize_epoch` the model is compiled again with `quantize` (fake-quant in the graph: k-means
centroids then train) and the optimizers are built again for the new parameters; a `quantize_epoch`
the trainer's `max_epochs` never reaches is refused at setup. Example inputs come from `example_inputs`
or the module's `example_input_array`.

Resuming (`fit(ckpt_path=...)`) restores the masks, the quantizers (a checkpoint saved after the
quantization epoch began is quantized again before its state is loaded, then not again) and `history`.
When the optimizers are rebuilt for the quantizers, every one is built by `configure_optimizers` again
(several, manual optimization, parameter subsets alike), and the learning-rate schedulers it returns keep
their progress: each takes the state of the one it replaces, and its optimizer's groups the hyperparameters
(the scheduled `lr`) the old groups had; per-parameter state (momentum) restarts.
A second `fit` of the module this callback compiled continues it (no second compile, not quantized again)
where the trainer continues its epochs (the same Trainer with more `max_epochs`, or `ckpt_path`); one that
starts the pruning schedule over at an epoch already done is refused.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..compile import compile as compile_model
from ..errors import ConfigError, MissingDependencyError
from ..passes import InsertFakeQuant, InsertMasks
from ..pruning.masks import get_mask, masked_layers, sparsity_of

try:  # the optional extra: the callback's base class
    import pytorch_lightning as pl
    _Callback: type = pl.Callback
except ImportError:  # pragma: no cover - exercised where Lightning is absent
    pl = None
    _Callback = object

UNITS = ("epoch", "step")


class Compression(_Callback):
    """Iterative pruning (masks in the graph, an AGP schedule) and quantization-aware training during fit.

    `history` holds one entry per epoch end: the epoch and each masked layer's sparsity.
    """

    def __init__(self, prune: InsertMasks | None = None, quantize: InsertFakeQuant | None = None, *,
                 quantize_epoch: int = 0, unit: str = "epoch", attribute: str = "model",
                 example_inputs: Any = None) -> None:
        if pl is None:
            raise MissingDependencyError("the Lightning callback needs pytorch-lightning: "
                                         "pip install 'fxcompress[lightning]'")
        if prune is not None and not isinstance(prune, InsertMasks):
            raise ConfigError(f"Compression.prune must be an InsertMasks pass, got {type(prune).__name__}")
        if quantize is not None and not isinstance(quantize, InsertFakeQuant):
            raise ConfigError(f"Compression.quantize must be an InsertFakeQuant pass, got {type(quantize).__name__}")
        if prune is None and quantize is None:
            raise ConfigError("Compression needs prune=InsertMasks(...), quantize=InsertFakeQuant(...) or both")
        if not isinstance(quantize_epoch, int) or isinstance(quantize_epoch, bool) or quantize_epoch < 0:
            raise ConfigError(f"Compression.quantize_epoch must be an epoch number >= 0, got {quantize_epoch!r}")
        if unit not in UNITS:
            raise ConfigError(f"Compression.unit must be one of {UNITS}, got {unit!r}")
        end = prune.schedule.end if prune is not None and prune.schedule is not None and unit == "epoch" else 0
        if quantize is not None and quantize_epoch < end:
            # k-means codes are fixed once the weights are quantized: later masks would change nothing
            raise ConfigError(f"Compression.quantize_epoch must be at or after the pruning schedule's end "
                              f"(epoch {end}), got {quantize_epoch}")
        self.prune, self.quantize, self.quantize_epoch, self.unit = prune, quantize, quantize_epoch, unit
        self.attribute, self.example_inputs = attribute, example_inputs
        self.model: nn.Module | None = None
        self.history: list[dict[str, Any]] = []
        self.quantized = False
        self._carried = False   # this fit's module holds the model an earlier fit compiled
        self._hook = None

    def _inputs(self, module) -> tuple:
        inputs = self.example_inputs if self.example_inputs is not None else getattr(module, "example_input_array",
                                                                                     None)
        if inputs is None:
            raise ConfigError("Compression.example_inputs: give example inputs, or set example_input_array on "
                              f"{type(module).__name__}")
        return inputs if isinstance(inputs, tuple) else (inputs,)

    def _replace(self, module, passes: list) -> None:
        model = getattr(module, self.attribute, None)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"Compression.attribute: {type(module).__name__}.{self.attribute} is not a "
                              f"torch.nn.Module (got {type(model).__name__})")
        self.model = compile_model(model, passes, example_inputs=self._inputs(module)).train(module.training)
        setattr(module, self.attribute, self.model)

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before the optimizers exist: the model with masks (at the schedule's start) in its graph."""
        if stage != "fit":
            return
        # a second fit of the same module: its model is the graph compiled here already, masks (and quantizers)
        # in it; compiling it again would put a second set of masks in the graph (and quantize the codebooks)
        self._carried = self.model is not None and getattr(pl_module, self.attribute, None) is self.model
        if not self._carried:   # a model of its own (or the first fit): nothing of an earlier fit applies to it
            self.model, self.quantized, self.history = None, False, []
        epochs = getattr(trainer, "max_epochs", None)  # None or -1: no limit
        if (self.quantize is not None and not self.quantized and epochs is not None and epochs >= 0
                and self.quantize_epoch >= epochs):
            # the epoch would never start: the model would end the fit without fake-quant, silently
            raise ConfigError(f"Compression.quantize_epoch={self.quantize_epoch} is never reached: the trainer's "
                              f"max_epochs={epochs} runs epochs numbered from 0 to {epochs - 1}, so the model "
                              f"would never be quantized")
        if self.prune is not None and not self._carried:
            self._replace(pl_module, [self.prune])
        # Resuming (fit(ckpt_path=...)): Lightning loads the module's state before this callback's and after
        # setup, so the graph must hold the fake-quant of a checkpoint saved after the quantization epoch began
        # by the time the module's state is loaded, or its quantizers' tensors are unexpected keys.
        if self._hook is not None:
            self._hook.remove()
        self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)

    def _before_load(self, module, state_dict, prefix, *args) -> None:
        """Quantize the model before a state that holds fake-quant tensors it does not have is loaded into
        it; the masks, codes and centroids themselves then come from that state."""
        if self.quantize is None or self.quantized:
            return
        model = getattr(module, self.attribute, None)
        ours = f"{prefix}{self.attribute}."
        own = set(model.state_dict()) if isinstance(model, nn.Module) else set()
        if any(key.startswith(ours) and key[len(ours):] not in own for key in state_dict):
            # compiled on the checkpoint's weights and masks, as it was when it was first quantized: what the
            # quantizers hold depends on them (a k-means codebook keeps a fixed zero apart where weights are 0)
            model.load_state_dict({key[len(ours):]: value for key, value in state_dict.items()
                                   if key.startswith(ours) and key[len(ours):] in own}, strict=False)
            self._replace(module, [self.quantize])
            self.quantized = True

    def state_dict(self) -> dict[str, Any]:
        return {"quantized": self.quantized, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer, pl_module) -> None:
        # after a checkpoint, if any, restored the epoch: a carried model whose schedule would start over at an
        # epoch it has passed would get lower sparsities again, its masks recomputed from the pruned weights
        schedule = self.prune.schedule if self.prune is not None else None
        if self._carried and schedule is not None and self.history and \
                trainer.current_epoch <= self.history[-1]["epoch"]:
            raise ConfigError(f"Compression: {type(pl_module).__name__}.{self.attribute} was compiled by this callback "
                              f"in an earlier fit and trained to epoch {self.history[-1]['epoch']}, but this fit "
                              f"starts at epoch {trainer.current_epoch}: the pruning schedule would run again from "
                              "there. Continue the earlier Trainer (raise its fit_loop.max_epochs and fit again), "
                              "resume its checkpoint with fit(ckpt_path=...), or fit a fresh module with a new "
                              "Compression callback")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # at or after its epoch (a run resumed past it from a checkpoint saved before), once only (a run
        # resumed within that epoch is quantized already: compiling again would quantize the codebooks)
        if self.quantize is not None and not self.quantized and trainer.current_epoch >= self.quantize_epoch:
            self._replace(pl_module, [self.quantize])
            self.quantized = True
            optimizers, schedulers = list(trainer.optimizers), [c.scheduler for c in trainer.lr_scheduler_configs]
            # configure_optimizers again: the old optimizers hold the parameters of the graph replaced, and the
            # new graph's parameters (centroids) train too, each with the optimizer of the submodule it is in
            trainer.strategy.setup_optimizers(trainer)
            _carry_progress(optimizers, trainer.optimizers, schedulers,
                            [c.scheduler for c in trainer.lr_scheduler_configs])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prune is not None and self.unit == "step":
            self.prune.update_masks(self.model, trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.model is None:  # quantization only, before its epoch: nothing compiled, no masks to follow
            return
        if self.prune is not None and self.unit == "epoch":
            self.prune.update_masks(self.model, trainer.current_epoch + 1)
        layers = {layer.name: sparsity_of(get_mask(self.model, layer)) for layer in masked_layers(self.model)}
        self.history.append({"epoch": trainer.current_epoch, "sparsity": layers})
        for name, value in layers.items():
            pl_module.log(f"sparsity/{name}", value)


def _carry_progress(old_optimizers: list, optimizers: list, old_schedulers: list, schedulers: list) -> None:
    """The rebuilt optimizers' schedules go on where the old ones were: rebuilt from scratch, a scheduler
    would restart (a decayed learning rate back at its initial value, a warmup run again). Each rebuilt
    group takes the old group's hyperparameters (the `lr` a scheduler set) and each scheduler the old
    one's state, when `configure_optimizers` built the same optimizers, groups and schedulers again."""
    if len(old_optimizers) != len(optimizers) or len(old_schedulers) != len(schedulers):
        return
    for old, new in zip(old_optimizers, optimizers):
        if type(old) is not type(new) or len(old.param_groups) != len(new.param_groups):
            return
    if any(type(old) is not type(new) for old, new in zip(old_schedulers, schedulers)):
        return
    for old, new in zip(old_optimizers, optimizers):
        for old_group, group in zip(old.param_groups, new.param_groups):
            group.update({key: value for key, value in old_group.items() if key != "params"})
    for old, new in zip(old_schedulers, schedulers):
        new.load_state_dict(old.state_dict())
