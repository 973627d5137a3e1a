"""LeNet-5's layers (conv1, conv2, fc1, fc2, max pooling between) at a few thousand weights, on 8x8 inputs:
for checks that are exact whatever the size (exports), where LeNet-5's 131 K weights only cost time."""
import torch
import torch.nn.functional as F
from torch import nn


class SmallLeNet(nn.Module):
    """conv1 (channels, kernel) -> pool -> conv2 (channels, kernel) -> pool -> fc1 (hidden) -> fc2 (10);
    each conv keeps its input's size (padding kernel // 2)."""

    def __init__(self, conv1: tuple[int, int], conv2: tuple[int, int], hidden: int) -> None:
        super().__init__()
        (c1, k1), (c2, k2) = conv1, conv2
        self.conv1, self.conv2 = nn.Conv2d(1, c1, k1, padding=k1 // 2), nn.Conv2d(c1, c2, k2, padding=k2 // 2)
        self.fc1, self.fc2 = nn.Linear(c2 * 2 * 2, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv2(F.max_pool2d(self.conv1(x), 2)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))
