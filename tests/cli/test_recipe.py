"""Recipe validation: every bad key or value is a ConfigError naming the file, the line and the key,
raised before any training (the data set is never loaded)."""
import pytest

from fxcompress.cli import recipe as recipe_module
from fxcompress.cli.recipe import load_recipe
from fxcompress.errors import ConfigError
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks
from fxcompress.pruning.schedule import AGP
from fxcompress.training import OptimizerConfig

GOOD = """
model: zoo:lenet300
data: digits
train: {epochs: 2, lr: 1e-3}
steps:
  - pass: InsertMasks
    config:
      sparsity: 0.5
      schedule: {end: 20, every: 5}
    finetune: {epochs: 1, lr: 5e-4, distill: {temperature: 2.0}}
  - pass: InsertFakeQuant
    config:
      method: linear
      bits: 8
      activations: {bits: 8}
  - pass: LowerToInteger
"""


def test_a_good_recipe_builds_its_passes_and_training(write_recipe):
    recipe = load_recipe(write_recipe(GOOD))
    masks, quant = recipe.steps[0].make(), recipe.steps[1].make()
    assert masks == InsertMasks(sparsity=0.5, schedule=AGP(end=20, every=5))
    assert quant == InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig(bits=8))
    assert recipe.train.lr == 1e-3 and isinstance(recipe.train.lr, float)  # YAML 1.1 would read "1e-3" as text
    assert recipe.steps[0].finetune.distill == {"temperature": 2.0, "alpha": 0.9}
    assert recipe.steps[2].finetune is None
    assert recipe.train.optimizer == OptimizerConfig() == recipe.steps[0].finetune.optimizer  # Adam, constant
    assert recipe.sensitivity is None


def test_fine_tuning_names_its_optimizer_weight_decay_and_schedule(write_recipe):
    text = GOOD.replace("finetune: {epochs: 1, lr: 5e-4, distill: {temperature: 2.0}}",
                        "finetune: {epochs: 1, lr: 0.01, optimizer: sgd, momentum: 0.9, nesterov: true,\n"
                        "               weight_decay: 1e-4, schedule: step, step_epochs: 2, gamma: 0.5}")
    text = text.replace("train: {epochs: 2, lr: 1e-3}", "train: {epochs: 2, lr: 1e-3, optimizer: adamw, "
                                                        "weight_decay: 0.01, schedule: cosine}")
    recipe = load_recipe(write_recipe(text + "sensitivity: true\n"))
    assert recipe.steps[0].finetune.optimizer == OptimizerConfig(optimizer="sgd", momentum=0.9, nesterov=True,
                                                                 weight_decay=1e-4, schedule="step",
                                                                 step_epochs=2, gamma=0.5)
    assert recipe.train.optimizer == OptimizerConfig(optimizer="adamw", weight_decay=0.01, schedule="cosine")
    assert recipe.sensitivity == {"sparsities": (0.5, 0.7, 0.8, 0.9, 0.95), "granularity": "element",
                                  "layers": None}
    assert [s.name for s in recipe.steps] == ["1-InsertMasks", "2-InsertFakeQuant", "3-LowerToInteger"]


def _line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old, new, needle, words", [
    ("train: {epochs: 2", "train: {epoch: 2", "train:", "unknown key train.epoch"),
    ("      sparsity: 0.5", "      sparsity: 1.5", "sparsity:", "InsertMasks.sparsity"),
    ("      sparsity: 0.5", "      sparsty: 0.5", "sparsty:", "unknown key steps[0].config.sparsty"),
    ("{end: 20, every: 5}", "{end: 20, every: 0}", "schedule:", "AGP.every"),
    ("{end: 20, every: 5}", "{end: 20, evry: 5}", "schedule:", "steps[0].config.schedule.evry"),
    ("{temperature: 2.0}", "{temperature: -2.0}", "distill:", "steps[0].finetune.distill.temperature"),
    ("      bits: 8\n", "      bits: 99\n", "bits: 99", "InsertFakeQuant.bits"),
    ("activations: {bits: 8}", "activations: {bits: 8, observer: mean}", "activations:", "ActivationConfig.observer"),
    ("  - pass: LowerToInteger", "  - pass: LowerToIntegers", "LowerToIntegers", "steps[2].pass must be one of"),
    ("data: digits", "data: imagenet", "data:", "data.name must be one of"),
    ("train: {epochs: 2, lr: 1e-3}", "train: {epochs: 2, lr: 1e-3, optimizer: rmsprop}", "train:",
     "train.optimizer must be one of 'sgd', 'adam', 'adamw'"),
    ("train: {epochs: 2, lr: 1e-3}", "train:\n  epochs: 2\n  optimizer: adam\n  momentum: 0.9", "momentum:",
     "OptimizerConfig.momentum=0.9 does not apply to optimizer 'adam'"),
    ("train: {epochs: 2, lr: 1e-3}", "train:\n  epochs: 2\n  optimizer: sgd\n  nesterov: true", "nesterov:",
     "nesterov=True needs OptimizerConfig.momentum > 0"),
    ("train: {epochs: 2, lr: 1e-3}", "train:\n  epochs: 2\n  schedule: cosine\n  gamma: 0.5", "gamma:",
     "OptimizerConfig.gamma=0.5 does not apply to schedule 'cosine'"),
    ("{epochs: 1, lr: 5e-4,", "{epochs: 1, lr: 5e-4, schedule: linear,", "finetune:",
     "steps[0].finetune.schedule must be one of 'constant', 'step', 'cosine'"),
    ("{epochs: 1, lr: 5e-4,", "{epochs: 1, lr: 5e-4, weight_decay: -1e-4,", "finetune:",
     "steps[0].finetune.weight_decay"),
    ("data: digits", "data: digits\nsensitivity: {sparsities: [0.5, 1.5]}", "sensitivity:",
     "sensitivity.sparsities must be a non-empty list of numbers in [0, 1]"),
    ("data: digits", "data: digits\nsensitivity: {granularity: row}", "sensitivity:", "sensitivity.granularity"),
    ("data: digits", "data: digits\nseed: -1", "seed:", "seed must be in"),
    ("  - pass: LowerToInteger", "  - pass: LowerToInteger\nseed: 1\nseed: 2", "seed: 2", "seed is given twice"),
    # a data set of fixed-size images is not resized: an image_size would be ignored (the model built for it)
    ("data: digits", "data:\n  name: digits\n  image_size: 16", "image_size:",
     "data.image_size: digits images are 8x8 and are not resized (only image-folder takes an image size)"),
    ("data: digits", "data: {name: cifar-10, root: c, image_size: 16}", "data:", "cifar-10 images are 32x32"),
])
def test_a_bad_key_or_value_is_reported_at_its_line(write_recipe, old, new, needle, words):
    assert old in GOOD
    text = GOOD.replace(old, new)
    with pytest.raises(ConfigError) as info:
        load_recipe(write_recipe(text))
    message = str(info.value)
    assert message.startswith(f"recipe.yaml:{_line_of(text.lstrip(chr(10)), needle)}: "), message
    assert words in message


def test_missing_sections_and_broken_yaml_are_reported(write_recipe):
    with pytest.raises(ConfigError, match=r"recipe.yaml:1: the recipe needs the key 'steps'"):
        load_recipe(write_recipe("model: zoo:lenet300\ndata: digits\n"))
    with pytest.raises(ConfigError, match=r"recipe.yaml:4: not valid YAML .*flow sequence at line 3"):
        load_recipe(write_recipe("model: zoo:lenet300\nsteps:\n  - pass: [InsertMasks\n"))
    with pytest.raises(ConfigError, match="steps is empty"):
        load_recipe(write_recipe("model: zoo:lenet300\ndata: digits\nsteps: []\n"))
    with pytest.raises(ConfigError, match="absent.yaml: cannot read the recipe"):
        load_recipe(write_recipe("x: 1").with_name("absent.yaml"))
    with pytest.raises(ConfigError, match=r"no recipe file 'deep_compression' and no shipped recipe of that name "
                                          r"\(shipped: .*deep_compression_lenet300"):
        load_recipe("deep_compression")


def test_a_shipped_recipe_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here: the package's own recipe
    recipe = load_recipe("deep_compression_lenet300")
    assert recipe.model == "zoo:lenet300" and recipe.doc.name == "deep_compression_lenet300.yaml"
    assert load_recipe("deep_compression_lenet300.yaml").steps[-1].make() == recipe.steps[-1].make()


def test_every_pass_of_the_package_can_be_named():
    import fxcompress.passes as passes
    # the literal list is the contract: a new pass must be nameable in a recipe
    assert set(recipe_module.PASSES) >= {"FoldBatchNorm", "InsertFakeQuant", "InsertMasks", "LowerToEncoded",
                                         "LowerToInteger", "PruneChannels", "LowerToSparse", "LowerWeightOnly",
                                         "LowerDynamicInt8", "SparseGPT"}
    assert set(recipe_module.PASSES) == {name for name in passes.__all__ if name != "ActivationConfig"}
    assert all(cls is getattr(passes, name) for name, cls in recipe_module.PASSES.items())


def test_fingerprints_change_from_the_changed_step_on(write_recipe):
    first = load_recipe(write_recipe(GOOD))
    changed = load_recipe(write_recipe(GOOD.replace("bits: 8\n", "bits: 7\n", 1), name="other.yaml"))
    assert first.fingerprint == changed.fingerprint
    assert first.steps[0].fingerprint == changed.steps[0].fingerprint
    assert first.steps[1].fingerprint != changed.steps[1].fingerprint
    assert first.steps[2].fingerprint != changed.steps[2].fingerprint
    assert load_recipe(write_recipe(GOOD), quick=True).fingerprint != first.fingerprint


def test_an_image_folder_takes_its_image_size(write_recipe):
    recipe = load_recipe(write_recipe(GOOD.replace("data: digits", "data: {name: image-folder, root: f, image_size: 16}")))
    assert recipe.data == {"name": "image-folder", "root": "f", "image_size": 16}
