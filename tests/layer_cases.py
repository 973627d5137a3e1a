"""Small modules that exercise layer finding, shared by the tests of layer selection, mask rules,
fake-quant rules, channel pruning and the file format."""
import torch
from torch import nn


class TiedHead(nn.Module):
    """A language-model shape whose head is tied to its embedding table: lm_head.weight is embed.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.lm_head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, x):
        return self.lm_head(self.fc(self.embed(x)))


class TransposedWithOutputSize(nn.Module):
    """A transposed convolution called with output_size, which its functional form cannot spell."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.up(x, output_size=[14, 14])


class NativeBlock(nn.Module):
    """A convolution, a residual add and a concatenation: every native integer module kind, ending in real
    values (a linear head on the pooled features). Input: (N, 3, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.side, self.head = nn.Conv2d(8, 4, 1), nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv(y) + y)
        y = torch.cat([y, self.side(y)], 1)
        return self.head(y.mean((2, 3)))
