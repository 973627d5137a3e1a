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

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64, use_cache=False)
CONFIGS = {  # name -> (config keywords, task)
    "falcon": (TEXT, "causal"),
    "gptj": ({**TEXT, "rotary_dim": 4}, "causal"),
    "cohere": ({**TEXT, "num_key_value_heads": 2}, "causal"),
    "efficientnet": (dict(image_size=32, num_labels=3, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
                     "image"),
    "mobilevit": (dict(image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
                       num_attention_heads=2, num_labels=3), "image"),
    "resnet": (dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3), "image"),
}


def _build(name: str):
    import transformers as hf
    keywords, task = CONFIGS[name]
    torch.manual_seed(0)
    config = hf.AutoConfig.for_model(name, **keywords)
    if task == "causal":
        return hf.AutoModelForCausalLM.from_config(config).eval(), torch.randint(3, 100, (2, 8))
    return hf.AutoModelForImageClassification.from_config(config).eval(), torch.randn(2, 3, 32, 32)


def _logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out.logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_front_end_reads_them_and_the_deep_compression_file_reproduces_them(name):
    model, x = _build(name)
    program = torch.export.export(model, (x,), strict=False)
    gm = fxcompress.compile(program, [], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(_logits(gm(x)), _logits(model(x)))
    assert not [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    if name == "falcon":  # its fused query-key-value, dense and MLP layers are linear layers, not matmuls
        assert sum(layer.kind == "linear" for layer in find_layers(gm)) == 4 * 2 + 1
    # the outputs are a dict: a pass verifies whether it changes the graph (BatchNorms folded) or not (none there)
    folded = fxcompress.compile(gm, [FoldBatchNorm()], example_inputs=(x,))
    assert fxcompress.history(folded)[-1].changed == (name in ("efficientnet", "mobilevit", "resnet"))
    with torch.no_grad():
        torch.testing.assert_close(_logits(folded(x)), _logits(model(x)), rtol=1e-4, atol=1e-5)
    fq = fxcompress.compile(program, [InsertMasks(sparsity=0.7), InsertFakeQuant(method="kmeans", bits=4)],
                            example_inputs=(x,))
    encoded = fxcompress.compile(fq, [LowerToEncoded()], example_inputs=(x,))
    with torch.no_grad():
        expected = _logits(fq(x))
        assert torch.equal(_logits(from_bytes(to_bytes(encoded, example_inputs=(x,)))(x)), expected)
