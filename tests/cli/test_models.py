"""Model specs of recipes: zoo names, `package.module:factory`, `transformers:ClassName`, and the keywords filled
from the data set."""
import copy
import json
import sys

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli.models import LogitsOf, build, export_free_batch, factory_of
from fxcompress.errors import ConfigError, MissingDependencyError
from fxcompress.layers import find_layers
from fxcompress.passes import InsertMasks
from fxcompress.zoo import LeNet5, LeNet300100


def test_zoo_models_get_their_sizes_from_the_data_set():
    lenet300 = build("zoo:lenet300", {}, (1, 8, 10))
    assert isinstance(lenet300, LeNet300100) and lenet300.fc1.in_features == 64
    lenet5 = build("zoo:lenet5", {"num_classes": 7}, (3, 28, 100))  # the recipe's own value wins
    assert isinstance(lenet5, LeNet5) and lenet5.conv1.in_channels == 3 and lenet5.fc2.out_features == 7


def test_a_factory_from_any_importable_module(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def mlp(in_features, num_classes, hidden=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes))\n"
        "def not_a_model():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build("mymodels:mlp", {"hidden": 9}, (3, 4, 6))
    assert [m.weight.shape for m in model if isinstance(m, nn.Linear)] == [(9, 48), (6, 9)]
    with pytest.raises(ConfigError, match="mymodels:not_a_model' returned a int, not an nn.Module"):
        build("mymodels:not_a_model", {}, (1, 8, 10))
    with pytest.raises(ConfigError, match=r"could not be built with .*'hidden': 'wide'"):
        build("mymodels:mlp", {"hidden": "wide"}, (1, 8, 10))
    with pytest.raises(ConfigError, match="mymodels has no callable 'absent'"):
        factory_of("mymodels:absent")


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match="model must be a string"):
        factory_of(3)
    with pytest.raises(ConfigError, match="unknown zoo model 'resnet9'"):
        factory_of("zoo:resnet9")


VIT = "transformers:ViTForImageClassification"
TINY_VIT = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "patch_size": 4}


def test_a_transformers_spec_names_an_image_classifier_built_from_its_config():
    transformers = pytest.importorskip("transformers")
    factory = factory_of(VIT)
    model = factory(image_size=8, num_channels=1, num_labels=3, **TINY_VIT)
    assert isinstance(model, LogitsOf) and isinstance(model.model, transformers.ViTForImageClassification)
    x = torch.rand(5, 1, 8, 8)
    logits = model.eval()(x)  # the logits tensor itself, not the ModelOutput
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, 3)
    assert torch.equal(logits, model.model(pixel_values=x).logits)


def test_the_data_set_fills_the_config_fields_the_recipe_leaves_out():
    pytest.importorskip("transformers")
    config = build(VIT, TINY_VIT, (1, 8, 10)).model.config
    assert (config.num_channels, config.image_size, config.num_labels, config.hidden_size) == (1, 8, 10, 16)
    config = build(VIT, {**TINY_VIT, "num_labels": 7, "image_size": 16}, (3, 8, 10)).model.config
    assert (config.num_channels, config.image_size, config.num_labels) == (3, 16, 7)  # the recipe's values win


def test_a_local_config_file_is_read_and_the_data_set_fills_what_it_leaves_out(tmp_path):
    transformers = pytest.importorskip("transformers")
    full = tmp_path / "full.json"
    transformers.ViTConfig(image_size=8, num_channels=1, num_labels=4, **TINY_VIT).to_json_file(str(full))
    config = build(VIT, {"config": str(full)}, (3, 16, 10)).model.config
    assert (config.num_channels, config.image_size, config.num_labels, config.hidden_size) == (1, 8, 4, 16)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({**TINY_VIT, "hidden_size": 24}))
    model = build(VIT, {"config": str(partial)}, (1, 8, 10))
    config = model.model.config
    assert (config.num_channels, config.image_size, config.num_labels, config.hidden_size) == (1, 8, 10, 24)
    assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_transformers_missing_is_a_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed (runs either way)
    with pytest.raises(MissingDependencyError, match=r"needs transformers: pip install 'fxcompress\[llm\]'"):
        factory_of(VIT)
    with pytest.raises(MissingDependencyError, match="model transformers:ViTForImageClassification needs"):
        build(VIT, TINY_VIT, (1, 8, 10))


def test_transformers_refusals_name_the_culprit(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="'google/vit-base-patch16-224' is not a local file; nothing is downloaded"):
        build(VIT, {"config": "google/vit-base-patch16-224"}, (1, 8, 10))
    with pytest.raises(ConfigError, match="unknown transformers model class 'ViTForPainting'"):
        factory_of("transformers:ViTForPainting")
    with pytest.raises(ConfigError, match="unknown transformers model class 'ViTConfig'"):
        factory_of("transformers:ViTConfig")  # a config, not a model
    with pytest.raises(ConfigError, match="BertForSequenceClassification takes no pixel_values"):
        factory_of("transformers:BertForSequenceClassification")
    with pytest.raises(ConfigError, match="ViTConfig has no field 'hiden_size'"):
        build(VIT, {"hiden_size": 32}, (1, 8, 10))  # transformers itself would keep the typo silently
    with pytest.raises(ConfigError, match="not both .also given: hidden_size"):
        build(VIT, {"config": str(tmp_path / "c.json"), "hidden_size": 32}, (1, 8, 10))
    (tmp_path / "broken.json").write_text("{hidden_size: 3")
    with pytest.raises(ConfigError, match="broken.json' is not a JSON config"):
        build(VIT, {"config": str(tmp_path / "broken.json")}, (1, 8, 10))
    with pytest.raises(ConfigError, match="could not be built from its config .KeyError: 'nope'"):
        build(VIT, {**TINY_VIT, "hidden_act": "nope"}, (1, 8, 10))
    with pytest.raises(ConfigError, match="could not be built from its config .(TypeError|.*image_size)"):
        build(VIT, {**TINY_VIT, "image_size": "large"}, (1, 8, 10))


def test_the_exported_classifier_takes_any_batch_size():
    pytest.importorskip("transformers")
    model = build(VIT, TINY_VIT, (1, 8, 10)).eval()
    program = export_free_batch(model, (torch.rand(2, 1, 8, 8),))
    gm = fxcompress.compile(program, [InsertMasks(sparsity=0.5)], example_inputs=(torch.rand(2, 1, 8, 8),))
    x = torch.rand(7, 1, 8, 8)
    masked = copy.deepcopy(model)
    for layer in find_layers(gm):  # the same masks on the eager model give the same logits
        masked.get_submodule(layer.name).weight.data *= gm.get_submodule(layer.name).weight_mask
    assert torch.allclose(gm(x), masked(x), atol=1e-5) and gm(x[:1]).shape == (1, 10)
