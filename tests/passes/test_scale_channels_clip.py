"""AWQ's clip (ScaleChannels(method="awq", clip=True), AutoAWQ's auto_clip): each quantization group is
the fold's weight clamped to a ratio of its max |w|, groups left whole are bit for bit the fold's, the
search lowers the groups' and the layer's calibration output error, and layers whose output reaches
attention scores (q / k, through scaled_dot_product_attention or a softmax) are not clipped."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from calibration import llama_mlp
from fxcompress.passes import InsertFakeQuant, ScaleChannels


class NormMLP(nn.Module):
    """LayerNorm with a few outlier channels -> fc1 -> GELU -> fc2 (no scale passes a GELU)."""

    def __init__(self, width: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, 32)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def _model_and_data():
    torch.manual_seed(0)
    model = NormMLP().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.weight[:4] = 20.0
    mixing = torch.randn(16, 64)
    return model, [(torch.randn(64, 16) @ mixing + 0.3 * torch.randn(64, 64),) for _ in range(4)]


def _groups(weight: torch.Tensor, size: int) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1, size)


@pytest.mark.parametrize("bits", [4, 3])
def test_clip_is_the_fold_clamped_per_group_and_lowers_the_output_error(bits):
    model, cal = _model_and_data()
    x = cal[0][0]
    config = dict(bits=bits, group_size=32)
    folded = fxcompress.compile(model, [ScaleChannels(clip=False, **config)], (x,), calibration_data=cal)
    clipped = fxcompress.compile(model, [ScaleChannels(**config)], (x,), calibration_data=cal)
    record = fxcompress.history(clipped)[-1]
    # the scales are searched before the clip: the norm takes the same fold either way
    assert torch.equal(clipped.norm.weight, folded.norm.weight) and torch.equal(clipped.norm.bias, folded.norm.bias)
    report = record.stats["layers"]["fc1"]["clip"]
    fold, clip = _groups(folded.fc1.weight, 32), _groups(clipped.fc1.weight, 32)
    bound = clip.abs().amax(-1, keepdim=True)
    assert torch.equal(clip, torch.minimum(torch.maximum(fold, -bound), bound))   # the fold's weight, clamped
    whole = (bound == fold.abs().amax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(clip[whole], fold[whole])   # a group not clipped is the fold's, bit for bit
    assert int((~whole).sum()) == report["groups_clipped"] > 0 and report["groups"] == whole.numel()
    ratios = (bound / fold.abs().amax(-1, keepdim=True)).squeeze(-1)[~whole]
    assert float(ratios.min()) >= 0.55 - 1e-6 and float(ratios.max()) < 1   # AutoAWQ's grid: 1 down to 0.55
    assert sum(report["ratios"].values()) == report["groups"]
    assert report["group_error_after"] < report["group_error_before"]
    assert report["error_after"] < report["error_before"]
    assert record.stats["layers_clipped"] == 2 and "fc1.weight" in record.params_touched
    # the clip changes the function in float only where it clamped: fc2 reads fc1 through a GELU (no scale)
    assert "skipped" in record.stats["layers"]["fc2"] and record.stats["layers"]["fc2"]["clip"]["groups_clipped"]


def test_a_clip_regex_clips_only_the_layers_it_names():
    model, cal = _model_and_data()
    x = cal[0][0]
    folded = fxcompress.compile(model, [ScaleChannels(group_size=32, clip=False)], (x,), calibration_data=cal)
    named = fxcompress.compile(model, [ScaleChannels(group_size=32, clip="fc2")], (x,), calibration_data=cal)
    layers = fxcompress.history(named)[-1].stats["layers"]
    assert "clip" not in layers["fc1"] and layers["fc2"]["clip"]["groups_clipped"] > 0
    assert torch.equal(named.fc1.weight, folded.fc1.weight)   # fc1 keeps its folded weight, unclipped
    assert not torch.equal(named.fc2.weight, folded.fc2.weight)
    with pytest.raises(ConfigError, match="ScaleChannels.clip"):
        ScaleChannels(clip="fc[")


def test_clip_needs_awq_and_a_grid_it_can_search():
    with pytest.raises(ConfigError, match="ScaleChannels.clip"):
        ScaleChannels(method="smoothquant", clip=False)
    with pytest.raises(ConfigError, match="ScaleChannels.max_shrink"):
        ScaleChannels(max_shrink=1.0)
    assert ScaleChannels().clip_ratios() == pytest.approx([1 - i / 20 for i in range(10)])
    assert ScaleChannels(clip_grid=4, max_shrink=0.3).clip_ratios() == pytest.approx([1.0, 0.75])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_queries_and_keys_are_not_clipped(attention):
    """As AutoAWQ skips q_proj / k_proj: their error reaches the output through the softmax of q . k."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      use_cache=False, attn_implementation=attention)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 16))
    cal = [(torch.randint(0, 64, (2, 16)),) for _ in range(2)]
    gm = fxcompress.compile(model, [ScaleChannels(group_size=16, select=r"model\.layers\..*")], (x,),
                            calibration_data=cal)
    layers = fxcompress.history(gm)[-1].stats["layers"]
    clips = {name.rsplit(".", 1)[-1]: report["clip"] for name, report in layers.items()}
    assert set(clips) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name in ("q_proj", "k_proj"):
        assert "attention scores" in clips[name]["skipped"], clips[name]
    for name, parent in (("v_proj", "self_attn"), ("o_proj", "self_attn"), ("gate_proj", "mlp"), ("up_proj", "mlp"),
                         ("down_proj", "mlp")):
        assert clips[name]["groups"] == model.get_submodule(f"model.layers.0.{parent}.{name}").weight.numel() // 16


@torch.no_grad()
def _block_mse(gm, model, x) -> float:
    return float((gm(x) - model(x)).pow(2).mean())


@pytest.fixture(scope="module")
def trained_mlp():
    """The trained Llama MLP, its calibration batches, and ScaleChannels(group_size=64) on it three ways:
    clip_objective "layer" and "block" (the default), and no clip. Computed once for the module's tests."""
    mlp, calibration, _ = llama_mlp.load()
    model = llama_mlp.ResidualMLP(mlp).eval()
    batches = list(calibration.split(128))
    scaled = {name: fxcompress.compile(model, [ScaleChannels(group_size=64, **kw)], (batches[0],),
                                       calibration_data=batches)
              for name, kw in (("layer", {"clip_objective": "layer"}), ("block", {}), ("folded", {"clip": False}))}
    return model, calibration, batches, scaled


def test_a_clip_is_kept_only_where_the_block_output_gains(trained_mlp):
    """On a trained Llama MLP the clip lowers gate's and up's own output errors yet raises the block's (the
    float down projection adds a clamp's signal-following error up): clip_objective="block" drops those two
    clips and keeps down's, and the quantized block is closer to float on the calibration data than with
    every clip kept (clip_objective="layer", AutoAWQ's)."""
    model, calibration, batches, scaled = trained_mlp
    quant = InsertFakeQuant(method="linear", bits=4, group_size=64, select=r"mlp\..*")
    # quantizing a scaled model is the second pass of compile(model, [ScaleChannels(...), quant]): the same graph
    compiled = {objective: fxcompress.compile(scaled[objective], [quant], (batches[0],))
                for objective in ("layer", "block")}
    clips = {name.rsplit(".", 1)[-1]: report["clip"]
             for name, report in fxcompress.history(compiled["block"])[0].stats["layers"].items()}
    for name in ("gate", "up", "down"):   # each decision is the comparison it reports
        clip = clips[name]
        assert clip["groups_clipped"] > 0 and clip["error_after"] < clip["error_before"]   # its own error falls
        assert clip["kept"] == (clip["block_error_clipped"] < clip["block_error_unclipped"])
    assert [clips[name]["kept"] for name in ("gate", "up", "down")] == [False, False, True]
    layer = fxcompress.history(compiled["layer"])[0].stats["layers"]["mlp.gate"]["clip"]
    assert "kept" not in layer   # AutoAWQ's: no block check
    block, every = (_block_mse(compiled[o], model, calibration) for o in ("block", "layer"))
    assert block < 0.95 * every, (block, every)   # measured: 2.10e-4 against 2.29e-4


def test_a_dropped_clip_leaves_the_folded_weight_bit_for_bit(trained_mlp):
    _, _, _, scaled = trained_mlp
    folded, checked = scaled["folded"], scaled["block"]
    assert torch.equal(checked.mlp.gate.weight, folded.mlp.gate.weight)   # dropped: the fold's weight
    assert torch.equal(checked.mlp.up.weight, folded.mlp.up.weight)
    assert not torch.equal(checked.mlp.down.weight, folded.mlp.down.weight)   # kept: clamped
