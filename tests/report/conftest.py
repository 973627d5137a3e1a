"""A small compressed LeNet-300-100 (8x8 inputs): fake-quant and encoded, and a sensitivity table."""
import pytest
import torch

import fxcompress
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import LeNet300100


@pytest.fixture(scope="module")
def compressed():
    """(dense model, fake-quant gm, encoded gm, inputs): 80% pruned, 4-bit k-means."""
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    dense = LeNet300100(in_features=64).eval()
    fake_quant = fxcompress.compile(dense, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                                    example_inputs=(x[:1],))
    encoded = fxcompress.compile(fake_quant, [LowerToEncoded()], example_inputs=(x[:1],))
    return dense, fake_quant, encoded, x


@pytest.fixture(scope="module")
def table(compressed):
    dense, _, _, x = compressed
    labels = dense(x).argmax(1)  # the dense model's own answers: its baseline is 1.0
    return fxcompress.sensitivity(dense, lambda m: (m(x).argmax(1) == labels).float().mean().item(), [0.5, 0.9])
