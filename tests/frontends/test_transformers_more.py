"""Hugging Face architectures whose exported graphs hold what the six of test_transformers.py do not: Falcon's
`x @ weight.T` linear layers, GPT-J's and Cohere's interleaved rotary tables, EfficientNet's padding="same"
convolutions, MobileViT's bilinear upsampling, and a vision model returning a dict (ResNet). Each goes through the
export front end (logits equal to the eager model's), a pass that changes nothing must verify, and Deep
Compression's file must reproduce the fake-quant logits bit for bit. benchmarks/hf_architectures.py runs 36
architectures through every pipeline; these are the ones that failed before their fixes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers (the transformers extra) is not installed", allow_module_level=True)

import fxcompress  # noqa: E402
from fxcompress.fileformat.container import from_bytes, to_bytes  # noqa: E402
from fxcompress.layers import find_layers  # noqa: E402
from fxcompress.passes import FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToEncoded  # noqa: E402
from hfmodels import build, logits  # noqa: E402

# the architectures whose fixes this file keeps (their configs: tests/hfmodels.py); EfficientNet at a quarter of its
# widths and depths (the default took 91 s here)
NAMES = ("cohere", "efficientnet", "falcon", "gptj", "mobilevit", "resnet")
SMALLER = {"efficientnet": dict(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)}


@pytest.mark.parametrize("name", NAMES)
def test_the_front_end_reads_them_and_the_deep_compression_file_reproduces_them(name):
    model, x, _ = build(name, **SMALLER.get(name, {}))
    program = torch.export.export(model, (x,), strict=False)
    gm = fxcompress.compile(program, [], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(logits(gm(x)), logits(model(x)))
    assert not [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    if name == "falcon":  # its fused query-key-value, dense and MLP layers are linear layers, not matmuls
        assert sum(layer.kind == "linear" for layer in find_layers(gm)) == 4 * 2 + 1
    # the outputs are a dict: a pass verifies whether it changes the graph (BatchNorms folded) or not (none there)
    folded = fxcompress.compile(gm, [FoldBatchNorm()], example_inputs=(x,))
    assert fxcompress.history(folded)[-1].changed == (name in ("efficientnet", "mobilevit", "resnet"))
    with torch.no_grad():
        torch.testing.assert_close(logits(folded(x)), logits(model(x)), rtol=1e-4, atol=1e-5)
    fq = fxcompress.compile(program, [InsertMasks(sparsity=0.7), InsertFakeQuant(method="kmeans", bits=4)],
                            example_inputs=(x,))
    encoded = fxcompress.compile(fq, [LowerToEncoded()], example_inputs=(x,))
    with torch.no_grad():
        expected = logits(fq(x))
        assert torch.equal(logits(from_bytes(to_bytes(encoded, example_inputs=(x,)))(x)), expected)
