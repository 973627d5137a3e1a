"""Small models trained on scikit-learn's digits, shared by the integer-lowering and export tests
through conftest's session fixture `trained_digits`."""
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.datasets import load_digits
from fxcompress.training import train
from fxcompress.zoo import BasicBlock, LeNet5


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
