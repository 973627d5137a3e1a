"""A small compressed LeNet-300-100 (8x8 inputs): fake-quant and encoded, a sensitivity table, and its full
report. Package-wide: the report's modules only read them, and a worker that runs more than one of them
builds them once."""
import pytest
import torch

import fxcompress
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.report import write_report
from fxcompress.zoo import LeNet300100


@pytest.fixture(scope="package")
def compressed():
    """(dense model, fake-quant gm, encoded gm, inputs): 80% pruned, 4-bit k-means."""
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    dense = LeNet300100(in_features=64).eval()
    fake_quant = fxcompress.compile(dense, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")],
                                    example_inputs=(x[:1],))
    encoded = fxcompress.compile(fake_quant, [LowerToEncoded()], example_inputs=(x[:1],))
    return dense, fake_quant, encoded, x


@pytest.fixture(scope="package")
def table(compressed):
    dense, _, _, x = compressed
    labels = dense(x).argmax(1)  # the dense model's own answers: its baseline is 1.0
    return fxcompress.sensitivity(dense, lambda m: (m(x).argmax(1) == labels).float().mean().item(), [0.5, 0.9])


@pytest.fixture(scope="package")
def report_page(compressed, table, tmp_path_factory):
    """The encoded model's full report (weights before quantization from the fake-quant model, sensitivity
    curves, MACs, facts), written once: the page tests read it and the browser test renders it."""
    _, fake_quant, encoded, x = compressed
    return write_report(encoded, tmp_path_factory.mktemp("report") / "r.html", reference=fake_quant,
                        sensitivity=table, example_inputs=(x[:1],), facts={"accuracy": "0.9 -> 0.9"},
                        title="LeNet <test>")
