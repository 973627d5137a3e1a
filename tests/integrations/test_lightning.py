"""The Lightning callback in a real `pl.Trainer` on CPU: masks follow the AGP schedule epoch by epoch,
fake-quant joins at its epoch, accuracy stays sane, and the result saves and loads with fxcompress."""
import pytest
import torch
import torch.nn.functional as F

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes import InsertFakeQuant, InsertMasks
from fxcompress.pruning.masks import get_mask, masked_layers, sparsity_of
from fxcompress.pruning.schedule import AGP
from fxcompress.quant.modules import KMeansWeight
from fxcompress.datasets import load_digits
from fxcompress.training import evaluate
from fxcompress.zoo import LeNet300100

# Lightning takes seconds to import: it is imported by the first test that needs it, not when the
# module is collected, and the classes deriving from its own are built then (a missing package skips).
@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("pytorch_lightning")


@pytest.fixture(scope="module")
def lightning(pl):
    return pytest.importorskip("fxcompress.integrations.lightning")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _classes(pl):
    """(Classifier, Recorder): a LightningModule over LeNet-300-100 and a callback recording fc1's
    mask sparsity after every optimizer step (it runs after the compression callback)."""

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = LeNet300100(in_features=64)
            self.example_input_array = torch.zeros(1, 1, 8, 8)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    class Recorder(pl.Callback):
        def __init__(self, compression):
            self.compression, self.seen = compression, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            layer = next(l for l in masked_layers(self.compression.model) if l.name == "fc1")
            self.seen.append((trainer.global_step, sparsity_of(get_mask(self.compression.model, layer))))

    return Classifier, Recorder


@pytest.fixture(scope="module")
def classes(pl):
    return _classes(pl)


@pytest.fixture(scope="module")
def fit(pl, classes):
    """fit(callback, data, epochs=2, extra=()) -> the trained LightningModule."""
    classifier = classes[0]

    def _fit(callback, data, epochs=2, extra=()):
        torch.manual_seed(0)
        module = classifier()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train_x, data.train_y),
                                             batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback, *extra])
        trainer.fit(module, loader)
        return module

    return _fit


def test_masks_follow_the_schedule_per_epoch(digits, lightning, fit):
    prune = InsertMasks(sparsity=0.8, schedule=AGP(end=2))
    callback = lightning.Compression(prune=prune)
    module = fit(callback, digits)
    assert isinstance(module.model, torch.fx.GraphModule) and module.model is callback.model
    assert [h["epoch"] for h in callback.history] == [0, 1]
    for entry, epoch in zip(callback.history, (1, 2)):
        expected = prune.schedule.sparsity(0.8, epoch)  # 0.7 after the first epoch, 0.8 after the second
        assert set(entry["sparsity"]) == {"fc1", "fc2", "fc3"}
        assert all(abs(s - expected) < 0.005 for s in entry["sparsity"].values()), (entry, expected)
    weights = {layer.name: fxcompress.layers.effective_weight(module.model, layer)
               for layer in fxcompress.layers.find_layers(module.model)}
    assert all(abs((w == 0).float().mean().item() - 0.8) < 0.005 for w in weights.values())
    assert evaluate(module.model, digits.test_x, digits.test_y) > 0.75


def test_a_schedule_in_optimizer_steps(digits, lightning, fit, classes):
    prune = InsertMasks(sparsity=0.6, schedule=AGP(end=20, every=5))
    callback = lightning.Compression(prune=prune, unit="step")
    recorder = classes[1](callback)
    module = fit(callback, digits, epochs=1, extra=[recorder])  # 45 steps: the schedule ends within the epoch
    assert len(recorder.seen) == 45 and [step for step, _ in recorder.seen] == list(range(1, 46))
    for step, sparsity in recorder.seen:  # rises every 5 steps, held in between, 0.6 from step 20 on
        assert abs(sparsity - prune.schedule.sparsity(0.6, step)) < 0.005, (step, sparsity)
    assert len({round(s, 3) for _, s in recorder.seen}) == 5  # steps 0 (none yet), 5, 10, 15, 20+
    (entry,) = callback.history
    assert all(abs(s - 0.6) < 0.005 for s in entry["sparsity"].values()), entry
    assert evaluate(module.model, digits.test_x, digits.test_y) > 0.75


def test_pruning_then_quantization_trains_and_saves(digits, tmp_path, lightning, fit):
    callback = lightning.Compression(prune=InsertMasks(sparsity=0.8, schedule=AGP(end=1)),
                                     quantize=InsertFakeQuant(bits=4, method="kmeans"), quantize_epoch=1)
    module = fit(callback, digits)
    gm = module.model
    quantizers = [m for m in gm.modules() if isinstance(m, KMeansWeight)]
    assert len(quantizers) == 3
    assert [r.name for r in fxcompress.history(gm)] == ["InsertMasks", "InsertFakeQuant"]
    accuracy = evaluate(gm, digits.test_x, digits.test_y)
    assert accuracy > 0.75
    path = tmp_path / "lightning.fxc"
    fxcompress.save(gm, path)
    loaded = fxcompress.load(path)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(digits.test_x), gm.eval()(digits.test_x))
    for layer in fxcompress.layers.find_layers(gm):
        weight = fxcompress.layers.effective_weight(gm, layer)
        assert torch.unique(weight).numel() <= 16 and (weight == 0).float().mean() > 0.79


def test_bad_settings_are_refused(lightning):
    with pytest.raises(ConfigError, match="Compression.prune"):
        lightning.Compression(prune=InsertFakeQuant(bits=4))
    with pytest.raises(ConfigError, match="needs prune"):
        lightning.Compression()
    with pytest.raises(ConfigError, match="Compression.unit"):
        lightning.Compression(prune=InsertMasks(sparsity=0.5), unit="batch")
    with pytest.raises(ConfigError, match="quantize_epoch must be at or after"):
        lightning.Compression(prune=InsertMasks(sparsity=0.5, schedule=AGP(end=3)), quantize=InsertFakeQuant(bits=4),
                              quantize_epoch=1)
    with pytest.raises(ConfigError, match="Compression.quantize_epoch"):
        lightning.Compression(quantize=InsertFakeQuant(bits=4), quantize_epoch=-1)


def test_a_missing_model_attribute_is_named(digits, lightning, fit):
    callback = lightning.Compression(prune=InsertMasks(sparsity=0.5), attribute="net")
    with pytest.raises(ConfigError, match="Classifier.net is not a torch.nn.Module"):
        fit(callback, digits, epochs=1)


def test_quantization_alone_joins_at_its_epoch(digits, lightning, fit):
    # nothing is compiled before epoch 1: the end of epoch 0 has no model of the callback's to read
    callback = lightning.Compression(quantize=InsertFakeQuant(bits=4, method="kmeans"), quantize_epoch=1)
    module = fit(callback, digits)
    gm = module.model
    assert gm is callback.model and [r.name for r in fxcompress.history(gm)] == ["InsertFakeQuant"]
    assert len([m for m in gm.modules() if isinstance(m, KMeansWeight)]) == 3
    assert callback.history == [{"epoch": 1, "sparsity": {}}]  # no masks: an entry from the quantized epoch on
    assert evaluate(gm, digits.test_x, digits.test_y) > 0.75


def test_a_quantize_epoch_the_trainer_never_reaches_is_refused(digits, lightning, fit):
    callback = lightning.Compression(prune=InsertMasks(sparsity=0.5), quantize=InsertFakeQuant(bits=4),
                                     quantize_epoch=2)
    with pytest.raises(ConfigError, match=r"Compression.quantize_epoch=2 is never reached: the trainer's "
                                          r"max_epochs=2 runs epochs numbered from 0 to 1"):
        fit(callback, digits, epochs=2)
    assert callback.model is None  # refused at setup, before the model was compiled


def _resumable(pl, classes, tmp_path):
    """run(callback, epochs, ckpt_path=None, extra=()) -> (module, trainer) on 64 random examples (4 steps an
    epoch), each run from a different initialization: what a resumed run holds comes from the checkpoint."""
    x, y = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10
    runs = []

    def run(callback, epochs, ckpt_path=None, extra=()):
        torch.manual_seed(len(runs))
        runs.append(module := classes[0]())
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback, *extra])
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
                    ckpt_path=ckpt_path)
        return module, trainer

    return run


def _first_state(pl):
    """A callback keeping the model's state as training starts (after the checkpoint was restored)."""

    class First(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            self.step = trainer.global_step

    return First()


def test_a_resumed_fit_continues_the_schedule_with_the_saved_masks(pl, lightning, classes, tmp_path):
    run = _resumable(pl, classes, tmp_path)
    module, trainer = run(lightning.Compression(prune=InsertMasks(sparsity=0.8, schedule=AGP(end=4))), 2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    saved = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback, first = lightning.Compression(prune=InsertMasks(sparsity=0.8, schedule=AGP(end=4))), _first_state(pl)
    resumed, _ = run(callback, 4, tmp_path / "half.ckpt", extra=[first])
    assert first.step == 8 and first.state.keys() == saved.keys()
    assert all(torch.equal(first.state[k], v) for k, v in saved.items())   # masks included, exactly
    assert [h["epoch"] for h in callback.history] == [0, 1, 2, 3]            # the callback's history came back
    assert all(abs(s - 0.8) < 0.005 for s in callback.history[-1]["sparsity"].values())
    for layer in fxcompress.layers.find_layers(resumed.model):                # the masks hold after the steps
        mask = get_mask(resumed.model, layer)
        assert not fxcompress.layers.effective_weight(resumed.model, layer)[mask == 0].any()


def test_a_fit_resumed_after_quantization_began_restores_the_quantizers(pl, lightning, classes, tmp_path):
    # the checkpoint's model holds k-means codebooks the freshly set up one has not: they were unexpected keys
    def compression():
        return lightning.Compression(prune=InsertMasks(sparsity=0.5, schedule=AGP(end=1)),
                                     quantize=InsertFakeQuant(bits=4, method="kmeans"), quantize_epoch=1)

    class SaveAt(pl.Callback):   # a checkpoint within the quantization epoch, as ModelCheckpoint(every_n_train_steps)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")
                self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    run = _resumable(pl, classes, tmp_path)
    saver = SaveAt()
    module, trainer = run(compression(), 2, extra=[saver])
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    for path, saved, epochs in (("end.ckpt", module.model.state_dict(), 3), ("mid.ckpt", saver.state, 2)):
        callback, first = compression(), _first_state(pl)
        resumed, _ = run(callback, epochs, tmp_path / path, extra=[first])
        assert first.state.keys() == saved.keys() and all(torch.equal(first.state[k], v) for k, v in saved.items())
        # quantized once: resuming within the quantization epoch does not compile the quantizers again
        assert [r.name for r in fxcompress.history(resumed.model)] == ["InsertMasks", "InsertFakeQuant"], path
        assert len([m for m in resumed.model.modules() if isinstance(m, KMeansWeight)]) == 3
        assert [h["epoch"] for h in callback.history] == list(range(epochs)), path


def _gan(pl):
    """A GAN-style LightningModule: manual optimization, an optimizer and a StepLR each over the generator and
    over the discriminator (each a parameter subset), returned as {"optimizer", "lr_scheduler"} dicts."""

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gen = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
            self.disc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.disc(self.gen(x))

    class GAN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.example_input_array, self.automatic_optimization = Pair(), torch.zeros(2, 8), False

        def training_step(self, batch, batch_idx):
            (x,) = batch
            for optimizer, target in zip(self.optimizers(), (0.0, 1.0)):
                loss = (self.model(x) - target).pow(2).mean()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            for scheduler in self.lr_schedulers():
                scheduler.step()

        def configure_optimizers(self):
            gen = torch.optim.Adam(self.model.gen.parameters(), lr=1e-2)
            disc = torch.optim.SGD(self.model.disc.parameters(), lr=1e-2, momentum=0.9)
            return ({"optimizer": gen, "lr_scheduler": torch.optim.lr_scheduler.StepLR(gen, 1, 0.5)},
                    {"optimizer": disc, "lr_scheduler": torch.optim.lr_scheduler.StepLR(disc, 1, 0.5)})

    class Seen(pl.Callback):   # after Compression's hook: the optimizers as the quantization epoch begins
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                names = {id(p): n for n, p in pl_module.model.named_parameters()}
                self.params = [[names.get(id(p), "stale") for g in o.param_groups for p in g["params"]]
                               for o in trainer.optimizers]
                self.lrs = [o.param_groups[0]["lr"] for o in trainer.optimizers]
                self.schedulers = [(c.scheduler.optimizer is o, c.scheduler.last_epoch)
                                   for c, o in zip(trainer.lr_scheduler_configs, trainer.optimizers)]
                self.wrapped = [w.optimizer is o for w, o in zip(pl_module.optimizers(), trainer.optimizers)]
                self.codebooks = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                                  if n.endswith("codebook")}

    return GAN, Seen


def _trainer(pl, epochs, callbacks):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_several_optimizers_and_schedulers_are_rebuilt_for_the_quantizers(pl, lightning):
    torch.manual_seed(0)
    gan, seen = _gan(pl)
    module, seen = gan(), seen()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=16)
    callback = lightning.Compression(prune=InsertMasks(sparsity=0.5, schedule=AGP(end=1)),
                                     quantize=InsertFakeQuant(bits=4, method="kmeans"), quantize_epoch=1)
    _trainer(pl, 3, [callback, seen]).fit(module, data)
    # each optimizer: its own submodule's new parameters and codebooks, nothing of the graph replaced
    assert seen.params == [[f"{part}.{i}.{name}" for i in (0, 2) for name in ("weight", "bias", "weight_quant.codebook")]
                           for part in ("gen", "disc")]
    assert seen.wrapped == [True, True]   # self.optimizers() in training_step hands out the rebuilt ones
    # the schedulers step the rebuilt optimizers and go on from epoch 0's 4 steps (they restarted at lr 1e-2)
    assert seen.schedulers == [(True, 4), (True, 4)] and seen.lrs == [1e-2 * 0.5 ** 4] * 2
    gm = module.model
    assert [r.name for r in fxcompress.history(gm)] == ["InsertMasks", "InsertFakeQuant"]
    trained = {n: p for n, p in gm.named_parameters() if n.endswith("codebook")}
    assert trained.keys() == seen.codebooks.keys() and all(not torch.equal(p, seen.codebooks[n])
                                                           for n, p in trained.items())
    for layer in fxcompress.layers.find_layers(gm):   # the masks still hold: pruned weights exactly zero
        mask = get_mask(gm, layer)
        assert sparsity_of(mask) == pytest.approx(0.5, abs=0.01)
        assert not fxcompress.layers.effective_weight(gm, layer)[mask == 0].any()


def test_a_second_fit_continues_the_compiled_model_or_is_refused(pl, lightning):
    torch.manual_seed(0)
    gan, _ = _gan(pl)
    module = gan()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=16)
    callback = lightning.Compression(prune=InsertMasks(sparsity=0.5, schedule=AGP(end=1)),
                                     quantize=InsertFakeQuant(bits=4, method="kmeans"), quantize_epoch=1)
    trainer = _trainer(pl, 2, [callback])
    trainer.fit(module, data)
    gm = module.model
    trainer.fit_loop.max_epochs = 3   # the same Trainer, one epoch more: the compiled model goes on
    trainer.fit(module, data)
    assert module.model is gm and [r.name for r in fxcompress.history(gm)] == ["InsertMasks", "InsertFakeQuant"]
    assert [h["epoch"] for h in callback.history] == [0, 1, 2]
    assert len([m for m in gm.modules() if isinstance(m, KMeansWeight)]) == 4
    # a new Trainer starts at epoch 0: the schedule would lower the masks again; refused, the model untouched
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ConfigError, match=r"GAN.model was compiled by this callback in an earlier fit and trained "
                                          r"to epoch 2, but this fit starts at epoch 0"):
        _trainer(pl, 2, [callback]).fit(module, data)
    assert module.model is gm and all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
