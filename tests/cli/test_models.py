"""Model specs of recipes: zoo names, `package.module:factory`, and the keywords filled from the data set."""
import pytest
from torch import nn

from fxcompress.cli.models import build, factory_of
from fxcompress.errors import ConfigError
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
