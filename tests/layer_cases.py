"""Small modules that exercise layer finding, shared by the tests of layer selection, mask rules,
fake-quant rules and channel pruning."""
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
