"""Hugging Face architectures whose exported graphs hold what the six of test_transformers.py do not: Falcon's
`x @ weight.T` linear layers, GPT-J's and Cohere's interleaved rotary tables, EfficientNet's padding="same"
convolutions, MobileViT's bilinear upsampling, a vision model returning a dict (ResNet), and two mixtures of experts
(Mixtral, Qwen2-MoE: routers that sort and count tokens per expert, experts stacked in one tensor on transformers 5,
one module each on 4). Each goes through the
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
from fxcompress.compressed_tensors import to_compressed_tensors  # noqa: E402
from fxcompress.errors import ConfigError  # noqa: E402
from fxcompress.fileformat.container import from_bytes, to_bytes  # noqa: E402
from fxcompress.layers import find_layers  # noqa: E402
from fxcompress.pruning.masks import get_mask  # noqa: E402
from fxcompress.passes import FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToEncoded, PruneChannels  # noqa: E402
from hfmodels import build, logits  # noqa: E402

# the architectures whose fixes this file keeps (their configs: tests/hfmodels.py); EfficientNet at a quarter of its
# widths and depths (the default took 91 s here)
NAMES = ("cohere", "efficientnet", "falcon", "gptj", "mobilevit", "resnet", "mixtral", "qwen2_moe")
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


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_every_expert_is_a_layer_each_pass_reaches(name, tmp_path):
    """transformers 5 stacks a layer's experts in one (experts, out, in) tensor run by a grouped product; the front
    end makes one linear layer per expert (transformers 4 has them as modules), so masks reach every expert."""
    model, x, other = build(name)
    stacked = [n for n, p in model.named_parameters() if p.dim() == 3]
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.7)], example_inputs=(x,))
    experts = [layer for layer in find_layers(gm) if ".experts." in layer.name]
    # 2 blocks x 4 experts x (gate_up + down on transformers 5; gate, up and down modules on 4)
    assert len(experts) == 2 * 4 * (2 if stacked else 3)
    for layer in experts:
        assert 0.65 < 1 - get_mask(gm, layer).float().mean().item() < 0.75, layer.name
    assert not [n for n, p in gm.named_parameters() if p.dim() == 3]  # no stacked expert tensor is left behind
    with torch.no_grad():  # the masked model still routes and runs another batch
        assert logits(gm(other)).shape == logits(model(other)).shape
    if stacked:
        with pytest.raises(ConfigError, match="experts of transformers 5's stacked expert tensors"):
            to_compressed_tensors(gm, tmp_path)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_reconstruction_leaves_the_routed_experts_and_refits_the_rest(name):
    """An expert's rows are the tokens its router sends it; pruning changes the router's inputs, so the rows
    captured before pruning are other tokens after it: experts are not refitted (they crashed the refit, reading
    positions past their new row count), the attention outputs whose head dims were pruned are."""
    model, x, other = build(name)
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, method="greedy", reconstruct=True)],
                            example_inputs=(x,), calibration_data=[x, other])
    refitted = fxcompress.history(gm)[-1].stats["reconstructed"]
    assert refitted and not [path for path in refitted if ".experts." in path]
    assert "model.layers.1.self_attn.o_proj" in refitted
    with torch.no_grad():
        assert torch.isfinite(logits(gm(other))).all()
