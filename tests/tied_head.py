"""A language-model-shaped module whose output head is tied to its embedding table, shared by the tests
of layer selection and of mask rules."""
from torch import nn


class TiedHead(nn.Module):
    """lm_head.weight is embed.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.lm_head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, x):
        return self.lm_head(self.fc(self.embed(x)))
