import gc
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from torch import nn

from fxcompress.datasets import load_digits
from fxcompress.training import train
from fxcompress.zoo import ZOO, BasicBlock, LeNet5

# Python's cyclic collector at its default thresholds (700 new objects) scans the young objects of
# fx graphs, sympy and transformers thousands of times a module: fewer, larger collections cost about
# a third less collection time here, and every object is still collected.
gc.set_threshold(20_000, 20, 50)

# One thread: on small shared machines, torch's thread pool makes tiny models many times slower.
torch.set_num_threads(1)

# Generated tests (hostile files, random architectures) run a bounded number of examples in CI;
# FXCOMPRESS_LONG=1 selects the long mode (many more examples, no time limit per example).
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = os.environ.get("FXCOMPRESS_LONG", "") not in ("", "0")
settings.load_profile("long" if LONG else "ci")

# compile() recomputes every analysis a pass reports preserved and fails if it differs.
os.environ.setdefault("FXCOMPRESS_CHECK_ANALYSES", "1")


# The longest test modules, longest first: they run first, so that under `--dist loadscope` (which hands
# out whole modules in collection order) the two workers finish together instead of one idling while the
# other runs a long module handed out last. A stale list costs balance only, never a test.
RUN_FIRST = (
    "tests/test_export_lowered.py", "tests/frontends/test_transformers.py", "tests/test_random_models.py",
    "tests/cli/test_recipes.py", "tests/cli/test_hf_recipe.py", "tests/cli/test_wheel.py",
    "tests/passes/test_pass_contract.py", "tests/cli/test_console.py", "tests/fileformat/test_format.py",
    "tests/test_text.py", "tests/pruning/test_global_threshold.py", "tests/passes/test_scale_channels.py",
    "tests/frontends/test_export_frontend.py", "tests/passes/test_fake_quant.py", "tests/passes/test_lower_sparse.py",
    "tests/passes/test_pass_contract_calibrated.py", "tests/kernels/test_native.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _seeded():
    # the CPU generator only: torch.manual_seed also queues a seed for every lazy accelerator backend,
    # formatting the caller's stack each time (about 2 ms a test here, for backends the tests never use)
    torch.random.default_generator.manual_seed(0)


@pytest.fixture(params=sorted(ZOO))
def zoo_model(request):
    """(name, model in eval mode, example inputs) for every model of the shared zoo."""
    make_model, make_input = ZOO[request.param]
    return request.param, make_model().eval(), (make_input(),)


class DigitsResNet(nn.Module):
    """A ResNet-style CNN for 8x8 digits: identity and strided downsample shortcuts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DIGITS_MODELS = {"lenet5": lambda: LeNet5(1, 8), "resnet": DigitsResNet}


class TrainedDigits:
    """The digits data set and small models trained on it (3 epochs, seed 0), each trained once per
    session on first use: the integer-lowering and export tests check agreement on real data."""

    def __init__(self) -> None:
        self.data = load_digits()
        self._models: dict[str, nn.Module] = {}

    def model(self, name: str) -> nn.Module:
        """The trained model in eval mode, shared: compile() copies it, a test that changes it copies it first."""
        if name not in self._models:
            torch.manual_seed(0)
            model = DIGITS_MODELS[name]()
            train(model, self.data, 3, lr=3e-3)
            self._models[name] = model.eval()
        return self._models[name]


@pytest.fixture(scope="session")
def trained_digits():
    return TrainedDigits()


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """fxcompress's wheel, built once per session without build isolation (offline) from a copy of the
    sources: setuptools' build/ folder in a checkout keeps files that moved away."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment, the wheel cannot be built offline")
    root, where = Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("wheel")
    source = where / "source"
    for part in ("fxcompress", "passes"):
        shutil.copytree(root / part, source / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(root / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(where / "dist")], check=True, capture_output=True)
    (wheel,) = (where / "dist").glob("fxcompress-*.whl")
    return wheel
