"""ScaleChannels (AWQ / SmoothQuant): the fold is exact in float on every producer the graph query
finds (norm weights, LayerNorm, a preceding linear through attention and the gated MLP, repeated
key / value heads), AWQ lowers the 4-bit output error of a layer fed by outlier channels, and
what cannot be folded is reported or refused by name."""
import dataclasses
import functools

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError, VerificationError
from fxcompress.passes import InsertFakeQuant
from fxcompress.layers import find_layers
from fxcompress.passes.scale_channels import ScaleChannels, awq_scales, weight_means
from fxcompress.zoo import Conv1D, hf_model


class NormMLP(nn.Module):
    """LayerNorm -> (fc1, fc2) sharing its output; fc1 -> ReLU -> fc3 (no fold through a ReLU)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.fc3(torch.relu(self.fc1(h))) + self.fc2(h)[..., :16]


def _outlier_model(width: int = 64, outliers: int = 4) -> NormMLP:
    torch.manual_seed(0)
    model = NormMLP(width).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.weight[:outliers] = 30.0   # a few input channels of fc1 / fc2 dominate their outputs
        model.norm.bias.normal_(0, 0.1)
    return model


@functools.cache
def _exported_llama(layers: int, kv_heads: int):
    """A tiny Llama, exported and compiled with no pass, and the generator's state after building it.
    Built once per shape for the module's tests (compile copies it; no test changes it in place).
    transformers is imported here, not at collection: only the worker that runs these tests pays for it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=kv_heads,
                                      max_position_embeddings=16, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)   # HF initializes norm weights to 1: make the fold visible
    x = torch.randint(0, 64, (2, 16))
    gm = fxcompress.compile(torch.export.export(model, (x,), strict=False), [], (x,))
    return gm, x, torch.random.get_rng_state()


def _llama(kv_heads: int):
    """The exported Llama, its input and its number of blocks. Grouped-query attention runs on the
    two-block export test_later_groups_calibrate_... reads too (an export costs about a second)."""
    blocks = 1 if kv_heads == 2 else 2
    gm, x, state = _exported_llama(blocks, kv_heads)
    torch.random.set_rng_state(state)  # what follows draws the numbers it drew when each test built its own
    return gm, x, blocks


def _per_block(blocks: int, producers: dict[str, str]) -> dict[str, str]:
    return {f"model.layers.{i}.{layer}": producer for i in range(blocks) for layer, producer in producers.items()}


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_fold_is_exact_on_llama_and_finds_every_producer(method, kv_heads):
    gm, x, blocks = _llama(kv_heads)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    reference = gm(x)["logits"].detach()
    cal = [(torch.randint(0, 64, (2, 16)),) for _ in range(2)]
    config = ScaleChannels(method=method, alpha=0.5, group_size=16, clip=False) if method == "awq" else \
        ScaleChannels(method=method)   # the clip changes weights on purpose: the fold alone is exact
    out_gm = fxcompress.compile(gm, [config], (x,), calibration_data=cal)
    out = out_gm(x)["logits"].detach()
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-5
    layers = fxcompress.history(out_gm)[-1].stats["layers"]
    producers = {name: report["producer"].rsplit(".", 2)[-2] for name, report in layers.items() if "producer" in report}
    norms = {"lm_head": "norm", **_per_block(blocks, {
        "self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
        "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
        "mlp.up_proj": "post_attention_layernorm"})}
    changed = [k for k, v in out_gm.state_dict().items() if k in before and not torch.equal(v, before[k])]
    for i in range(blocks):
        assert f"model.layers.{i}.input_layernorm.weight" in changed and \
            f"model.layers.{i}.self_attn.v_proj.weight" in changed
    if method == "smoothquant":   # as the paper: only norms take the scales
        assert producers == norms
        for name in _per_block(blocks, {"self_attn.o_proj": None, "mlp.down_proj": None}):
            assert "folds only into norms" in layers[name]["skipped"]
        return
    assert producers == {**norms, **_per_block(blocks, {"self_attn.o_proj": "self_attn", "mlp.down_proj": "mlp"})}
    for i in range(blocks):
        assert layers[f"model.layers.{i}.self_attn.o_proj"]["producer"] == f"model.layers.{i}.self_attn.v_proj"
        assert layers[f"model.layers.{i}.mlp.down_proj"]["producer"] == f"model.layers.{i}.mlp.up_proj"


def test_layernorm_fold_is_exact_and_smoothquant_takes_only_norms():
    model = _outlier_model()
    x = torch.randn(32, 64)
    gm = fxcompress.compile(model, [ScaleChannels(method="smoothquant")], (x,), calibration_data=[(x,)])
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))
    layers = fxcompress.history(gm)[-1].stats["layers"]
    assert layers["fc1"]["producer"] == layers["fc2"]["producer"] == "norm"
    # fc3 reads relu(fc1): the query passes the ReLU and finds fc1, a linear layer SmoothQuant leaves alone
    assert "fc1 is a linear layer: SmoothQuant folds only into norms" in layers["fc3"]["skipped"]
    assert not torch.equal(gm.get_submodule("norm").bias, model.norm.bias)   # the bias is divided too


class ActivationMLP(nn.Module):
    """fc1 -> activation -> fc2, as OPT's (ReLU) or GPT-2's (GELU) MLP; a few fc1 units are outliers,
    a few never fire (a dead ReLU unit: mean |x| = 0, which a scale must survive)."""

    def __init__(self, activation: str, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act = nn.LeakyReLU(0.1) if activation == "leaky module" else nn.ReLU()
        self.activation = activation

    def forward(self, x):
        h = self.fc1(x)
        if self.activation == "relu":
            h = torch.relu(h)
        elif self.activation == "relu method":
            h = h.relu()
        elif self.activation == "gelu":
            h = torch.nn.functional.gelu(h)
        else:
            h = self.act(h)
        return self.fc2(h)


def _activation_mlp(activation: str) -> ActivationMLP:
    torch.manual_seed(0)
    model = ActivationMLP(activation).eval()
    with torch.no_grad():
        model.fc1.weight[:4] *= 25.0         # outlier units: their activations dominate fc2's input
        model.fc1.weight[4:8] = 0.0          # dead units: ReLU(bias < 0) is 0 on every input
        model.fc1.bias[4:8] = -1.0
    return model


@pytest.mark.parametrize("activation", ["relu", "relu method", "module", "leaky module"])
def test_awq_scales_pass_a_relu_into_the_layer_before(activation):
    """ReLU and leaky ReLU commute with a positive scale, so fc2's scales fold into fc1's rows (AutoAWQ's
    OPT fc1 -> fc2): exact in float, dead units included, and fc2's 4-bit output error falls."""
    model = _activation_mlp(activation)
    cal = [(torch.randn(64, 64),) for _ in range(4)]
    test = torch.randn(256, 64)
    quant = InsertFakeQuant(method="linear", bits=4, group_size=32, select="fc2")
    awq = ScaleChannels(bits=4, group_size=32, select="fc2")
    folded = fxcompress.compile(model, [replace_clip(awq)], (test[:4],), calibration_data=cal)
    with torch.no_grad():
        reference = model(test)
        assert float((folded(test) - reference).abs().max() / reference.abs().max()) < 1e-5
    report = fxcompress.history(folded)[-1].stats["layers"]["fc2"]
    assert report["producer"] == "fc1" and report["alpha"] > 0
    assert torch.isfinite(folded.get_submodule("fc1").weight).all()
    plain = fxcompress.compile(model, [quant], (test[:4],))
    scaled = fxcompress.compile(model, [awq, quant], (test[:4],), calibration_data=cal)
    assert _output_error(scaled, model, test) < 0.7 * _output_error(plain, model, test)


def test_a_gelu_stops_the_query():
    """GELU is not homogeneous: GELU(x / s) != GELU(x) / s, so no scale reaches fc1 through it."""
    model = _activation_mlp("gelu")
    x = torch.randn(32, 64)
    gm = fxcompress.compile(model, [ScaleChannels(group_size=32, select="fc2")], (x,), calibration_data=[(x,)])
    assert "gelu) is not an op that keeps channels" in fxcompress.history(gm)[-1].stats["layers"]["fc2"]["skipped"]


def test_insert_scales_puts_awq_scales_where_no_producer_takes_them(tmp_path):
    """With insert_scales, fc2's scales behind a GELU go into a product of their own (AutoAWQ's
    ScaledActivation): exact in float, fc2's 4-bit output error falls as through a ReLU, the file keeps the
    product, and a compressed-tensors export, which has no place for it, refuses by name."""
    model = _activation_mlp("gelu")
    cal = [(torch.randn(64, 64),) for _ in range(4)]
    test = torch.randn(256, 64)
    awq = ScaleChannels(bits=4, group_size=32, select="fc2", insert_scales=True)
    folded = fxcompress.compile(model, [replace_clip(awq)], (test[:4],), calibration_data=cal)
    with torch.no_grad():
        reference = model(test)
        assert float((folded(test) - reference).abs().max() / reference.abs().max()) < 1e-5
    stats = fxcompress.history(folded)[-1].stats
    assert stats["scales_inserted"] == ["fc2.weight_inverse_scale"]
    assert stats["layers"]["fc2"]["producer"] == "fc2.weight_inverse_scale" and stats["layers"]["fc2"]["alpha"] > 0
    inverse = folded.get_buffer("fc2.weight_inverse_scale")
    assert not torch.equal(inverse, torch.ones_like(inverse))
    quant = InsertFakeQuant(method="linear", bits=4, group_size=32, select="fc2")
    plain = fxcompress.compile(model, [quant], (test[:4],))
    scaled = fxcompress.compile(model, [awq, quant], (test[:4],), calibration_data=cal)
    assert _output_error(scaled, model, test) < 0.7 * _output_error(plain, model, test)
    fxcompress.save(scaled, tmp_path / "scaled.fxc")
    loaded = fxcompress.load(tmp_path / "scaled.fxc")
    with torch.no_grad():
        assert torch.equal(loaded(test), scaled(test))
    from fxcompress.compressed_tensors import to_compressed_tensors
    with pytest.raises(ConfigError, match="'fc2' reads its input times fc2.weight_inverse_scale"):
        to_compressed_tensors(scaled, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_an_inserted_scale_that_stays_one_is_taken_out_again():
    """alpha = 0 (plain rounding) leaves the inserted buffer all ones: the graph and state are as before."""
    model = _activation_mlp("gelu")
    x = torch.randn(32, 64)
    gm = fxcompress.compile(model, [ScaleChannels(alpha=0.0, group_size=32, clip=False, select="fc2",
                                                  insert_scales=True)], (x,), calibration_data=[(x,)])
    assert fxcompress.history(gm)[-1].stats["scales_inserted"] == []
    assert "mul" not in gm.code and set(gm.state_dict()) == set(model.state_dict())


def replace_clip(config: ScaleChannels) -> ScaleChannels:
    """The same search with the clip off: the clip changes weights on purpose, the fold alone is exact."""
    return dataclasses.replace(config, clip=False)


@torch.no_grad()
def _output_error(gm, model, x) -> float:
    return float((gm(x) - model(x)).pow(2).mean())


def test_awq_lowers_4bit_error_on_a_layer_with_outlier_input_channels():
    model = _outlier_model()
    cal = [(torch.randn(64, 64),) for _ in range(4)]
    test = torch.randn(256, 64)
    quant = InsertFakeQuant(method="linear", bits=4, group_size=32, select="fc[12]")
    plain = fxcompress.compile(model, [quant], (test[:4],))
    awq = fxcompress.compile(model, [ScaleChannels(bits=4, group_size=32, select="fc[12]"), quant], (test[:4],),
                             calibration_data=cal)
    report = fxcompress.history(awq)[0].stats["layers"]["fc1"]
    assert report["alpha"] > 0 and report["error"] < report["error_plain"]
    assert _output_error(awq, model, test) < 0.6 * _output_error(plain, model, test)


def test_smoothquant_moves_activation_outliers_into_the_weights():
    model = _outlier_model()
    x = torch.randn(64, 64)
    gm = fxcompress.compile(model, [ScaleChannels(method="smoothquant", alpha=0.5, select="fc[12]")], (x,),
                            calibration_data=[(x,)])
    with torch.no_grad():
        h_before = model.norm(x).abs().amax(0)
        h_after = gm.get_submodule("norm")(x).abs().amax(0)
    # the activations' outlier ratio shrinks by the square root (alpha 0.5 balances them with the weights)
    assert float(h_after.max() / h_after.median()) < 0.5 * float(h_before.max() / h_before.median())


def test_refusals_name_the_culprit():
    model = _outlier_model()
    x = torch.randn(8, 64)
    with pytest.raises(PreconditionError, match="calibration data"):
        fxcompress.compile(model, [ScaleChannels()], (x,))
    with pytest.raises(ConfigError, match="ScaleChannels.grid"):
        ScaleChannels(method="smoothquant", grid=5)
    with pytest.raises(ConfigError, match="ScaleChannels.insert_scales"):
        ScaleChannels(method="smoothquant", insert_scales=True)
    with pytest.raises(ConfigError, match="'fc1'.*group_size=48 does not divide"):
        fxcompress.compile(model, [ScaleChannels(group_size=48)], (x,), calibration_data=[(x,)])
    quantized = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8)], (x,))
    with pytest.raises(PreconditionError, match="'fc1'.*before InsertFakeQuant"):
        fxcompress.compile(quantized, [ScaleChannels()], (x,), calibration_data=[(x,)])


class Conv1DChain(nn.Module):
    """LayerNorm -> up -> down as HF's Conv1D layers (addmm with [in, out] weights): the norm and the
    up layer are the two producers; `linear=True` builds the nn.Linear twin read by the same forward."""

    def __init__(self, width: int = 32, hidden: int = 64, linear: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        make = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1D(o, i))
        self.up, self.down = make(width, hidden), make(hidden, 16)

    def forward(self, x):
        return self.down(self.up(self.norm(x)))


def _conv1d_pair():
    torch.manual_seed(0)
    model = Conv1DChain().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.weight[:3] = 20.0   # outlier channels, so the scales are far from 1
        for layer in (model.up, model.down):
            layer.weight.normal_(0, 0.2)
            layer.bias.normal_(0, 0.1)
    twin = Conv1DChain(linear=True).eval()
    with torch.no_grad():
        twin.norm.load_state_dict(model.norm.state_dict())
        for name in ("up", "down"):
            getattr(twin, name).weight.copy_(getattr(model, name).weight.t())
            getattr(twin, name).bias.copy_(getattr(model, name).bias)
    return model, twin, torch.randn(2, 6, 32) * 2


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_conv1d_layers_are_scaled_exactly_and_like_their_linear_twins(method, frontend):
    model, twin, x = _conv1d_pair()
    config = ScaleChannels(method=method, bits=4, group_size=16, grid=10, clip=False, duo_scaling=False) \
        if method == "awq" else \
        ScaleChannels(method=method)
    gm = fxcompress.compile(model, [config], (x,), calibration_data=[x, x * 0.5], frontend=frontend)
    ref = fxcompress.compile(twin, [config], (x,), calibration_data=[x, x * 0.5], frontend="fx")
    stats, expected = fxcompress.history(gm)[-1].stats, fxcompress.history(ref)[-1].stats
    # same producers, alphas, errors and scale ranges (an exported norm is named by its weight)
    named = {layer: {**r, "producer": r.get("producer", "").removesuffix(".weight")}
             for layer, r in stats["layers"].items()}
    assert named == {layer: {**r, "producer": r.get("producer", "")} for layer, r in expected["layers"].items()}
    assert stats["layers_scaled"] == (2 if method == "awq" else 1)   # SmoothQuant folds only into norms
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)   # the rewrite is exact in float
        torch.testing.assert_close(gm.norm.weight, ref.norm.weight, rtol=1e-6, atol=0)
        for name in ("up", "down"):
            scaled = name == "up" or method == "awq"   # SmoothQuant leaves `down` (fed by a linear layer)
            assert torch.equal(gm.get_parameter(f"{name}.weight"), getattr(model, name).weight) != scaled
            torch.testing.assert_close(gm.get_parameter(f"{name}.weight").t(), ref.get_parameter(f"{name}.weight"),
                                       rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(gm.get_parameter(f"{name}.bias"), ref.get_parameter(f"{name}.bias"),
                                       rtol=1e-6, atol=1e-7)


class FusedAttention(nn.Module):
    """A pre-norm attention block with one fused q / k / v projection cut by `split` (GPT-2's c_attn, Falcon's
    and GPT-NeoX's query_key_value), then the output projection and the residual add."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.norm = nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm(x)).split(self.width, dim=-1)
        heads = [t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        y = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(batch, tokens, width))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_fused_qkv_layer_scales_only_its_value_piece_for_the_output_projection(frontend):
    """v -> o through a split: the fused layer's v rows (and bias) are divided, its q and k rows stay bit for bit,
    and the block computes what it did."""
    torch.manual_seed(0)
    model = FusedAttention().eval()
    with torch.no_grad():
        model.qkv.weight[64:70] *= 8   # outlier value channels, so the scales are far from 1
    x = torch.randn(2, 8, 32)
    config = ScaleChannels(alpha=0.5, duo_scaling=False, group_size=16, clip=False, select="out")  # qkv unscaled
    gm = fxcompress.compile(model, [config], (x,), calibration_data=[(torch.randn(2, 8, 32),)], frontend=frontend)
    report = fxcompress.history(gm)[-1].stats["layers"]["out"]
    assert report["producer"] == "qkv" and report["scale_max"] / report["scale_min"] > 2
    qkv = gm.get_submodule("qkv")
    assert torch.equal(qkv.weight[:64], model.qkv.weight[:64]) and torch.equal(qkv.bias[:64], model.qkv.bias[:64])
    assert not torch.equal(qkv.weight[64:], model.qkv.weight[64:])
    assert not torch.equal(qkv.bias[64:], model.qkv.bias[64:])
    with torch.no_grad():
        reference = model(x)
        assert float((gm(x) - reference).abs().max() / reference.abs().max()) < 1e-5


def test_a_fold_that_would_change_the_model_is_refused(monkeypatch):
    """Each fold is checked on the example inputs: scales put on the wrong channels (here the channel map
    reversed, as a graph query that took the wrong path would) raise instead of changing the model."""
    from fxcompress.passes import scale_channels as sc

    found = sc.map_channels
    monkeypatch.setattr(sc, "map_channels", lambda *args: (found(*args)[0].flip(0), ""))
    model = _outlier_model()
    x = torch.randn(16, 64)
    with pytest.raises(VerificationError, match="folded into norm did not divide .* on the example inputs"):
        fxcompress.compile(model, [ScaleChannels(alpha=0.5, group_size=16, clip=False)], (x,), calibration_data=[(x,)])


class TokenSplit(nn.Module):
    """fc1's output cut along tokens: both pieces carry every channel, so fc2's input cannot be rescaled."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        first, rest = self.fc1(x).split(2, dim=1)
        return self.fc2(first) + rest.sum(1, keepdim=True)


def test_a_split_along_tokens_is_not_a_piece_of_channels():
    x = torch.randn(2, 4, 16)
    gm = fxcompress.compile(TokenSplit().eval(), [ScaleChannels(group_size=16, clip=False)], (x,),
                            calibration_data=[(x,)])
    report = fxcompress.history(gm)[-1].stats["layers"]["fc2"]
    assert "channel ids cannot pass getitem" in report["skipped"]


def _scaled_hf(name: str, config: ScaleChannels) -> dict[str, dict]:
    """transformers' `name` (one block, random weights) exported, scaled by `config` on two calibration batches,
    its logits checked unchanged; the pass's report per layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        model = hf_model("gpt2", hidden=32, layers=1, heads=4, ffn=128, vocab=64, positions=16)
    else:   # OPT is not among the zoo's models: its ReLU MLP is what this file tests
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=16, word_embed_proj_dim=32, use_cache=False))
    model.eval()
    x = torch.randint(0, 64, (2, 8))
    cal = [(torch.randint(0, 64, (2, 8)),) for _ in range(2)]
    gm = fxcompress.compile(torch.export.export(model, (x,), strict=False), [config], (x,), calibration_data=cal)
    with torch.no_grad():
        reference = model(x).logits
        assert float((gm(x)["logits"] - reference).abs().max() / reference.abs().max()) < 1e-5
    return fxcompress.history(gm)[-1].stats["layers"]


@pytest.mark.parametrize("insert", [False, True], ids=["folds only", "insert_scales"])
def test_gpt2_scales_its_attention_output_from_the_fused_c_attn(insert):
    """transformers' GPT-2: c_attn (HF's Conv1D, one fused q / k / v) is the producer of attn.c_proj; the MLP's
    c_proj reads a GELU of c_fc, which no scale passes: skipped with the reason, or with insert_scales
    scaled by a product of its own."""
    layers = _scaled_hf("gpt2", ScaleChannels(alpha=0.5, group_size=16, clip=False, insert_scales=insert))
    assert layers["transformer.h.0.attn.c_proj"]["producer"] == "transformer.h.0.attn.c_attn"
    assert layers["transformer.h.0.attn.c_attn"]["producer"] == "transformer.h.0.ln_1.weight"
    if insert:
        assert layers["transformer.h.0.mlp.c_proj"]["producer"] == "transformer.h.0.mlp.c_proj.weight_inverse_scale"
    else:
        assert "is not an op that keeps channels" in layers["transformer.h.0.mlp.c_proj"]["skipped"]


def test_opt_scales_fc2_into_fc1_through_its_relu():
    """transformers' OPT: fc2 reads ReLU(fc1), which a positive scale passes, so every linear layer of the block
    takes scales (fc1 from the final LayerNorm, fc2 from fc1, out_proj from v_proj); logits unchanged."""
    layers = _scaled_hf("opt", ScaleChannels(alpha=0.5, group_size=16, clip=False))
    block = "model.decoder.layers.0"
    assert layers[f"{block}.fc2"]["producer"] == f"{block}.fc1"
    assert layers[f"{block}.fc1"]["producer"] == f"{block}.final_layer_norm.weight"
    assert layers[f"{block}.self_attn.out_proj"]["producer"] == f"{block}.self_attn.v_proj"
    assert not any("skipped" in report for report in layers.values())


def _llama_blocks(layers: int = 2):
    """A tiny Llama of `layers` blocks, exported, with norm weights away from 1 so the scales matter."""
    gm, x, _ = _exported_llama(layers, 1)
    cal = [(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    return gm, x, cal


def test_the_block_output_is_found_in_the_graph_and_searched_on():
    """AWQ's "module to inspect": the value each group's block adds back to the residual stream (o_proj's
    output for q / k / v and v -> o, down_proj's for gate / up and up -> down), found by the graph query."""
    gm, x, cal = _llama_blocks(2)   # the export the later-groups test reads too: each block's own outputs
    nodes = {layer.name: layer.node for layer in find_layers(gm)}
    out = fxcompress.compile(gm, [ScaleChannels(group_size=16, select=r"model\.layers\..*")], (x,),
                             calibration_data=cal)
    layers = fxcompress.history(out)[-1].stats["layers"]
    inspected = {name: (report["inspected"], report["objective"]) for name, report in layers.items()}
    block = {"self_attn.q_proj": "self_attn.o_proj", "self_attn.k_proj": "self_attn.o_proj",
             "self_attn.v_proj": "self_attn.o_proj", "self_attn.o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.down_proj", "mlp.up_proj": "mlp.down_proj", "mlp.down_proj": "mlp.down_proj"}
    assert inspected == {f"model.layers.{i}.{name}": (nodes[f"model.layers.{i}.{output}"], "block")
                         for i in range(2) for name, output in block.items()}


def test_without_a_residual_add_the_search_reads_the_layers_own_errors():
    model = _outlier_model()
    x = torch.randn(32, 64)
    gm = fxcompress.compile(model, [ScaleChannels(group_size=32)], (x,), calibration_data=[(x,)])
    layers = fxcompress.history(gm)[-1].stats["layers"]
    assert layers["fc1"]["objective"] == "layer" and "no residual add after fc1, fc2" in layers["fc1"]["inspected"]


def test_later_groups_calibrate_on_what_the_rescaled_graph_computes():
    """The fold leaves the model's function unchanged in float, so every group after the first sees the
    same inputs (the same Hessian, the same plain-rounding error) whatever scales the earlier ones took."""
    gm, x, cal = _llama_blocks(2)
    reports = []
    for alpha in (0.0, 0.9):
        config = ScaleChannels(alpha=alpha, duo_scaling=False, group_size=16, clip=False, objective="layer",
                               select=r"model\.layers\..*")
        out = fxcompress.compile(gm, [config], (x,), calibration_data=cal)
        reports.append(fxcompress.history(out)[-1].stats["layers"])
    first = "model.layers.0.self_attn.q_proj"
    assert reports[1][first]["scale_max"] > 1.5 * reports[0][first]["scale_max"]   # the scales differ
    for name, report in reports[0].items():
        if name != first and not name.endswith(("k_proj", "v_proj")):   # q / k / v share the first input
            assert reports[1][name]["error_plain"] == pytest.approx(report["error_plain"], rel=1e-4), name


def test_duo_scaling_divides_by_the_weights_normalized_group_magnitude():
    weights = [torch.tensor([[1.0, 2.0, -3.0, 6.0]]), torch.tensor([[-4.0, 4.0, 1.0, 1.0]])]
    w_mean = weight_means(weights, group_size=2)   # |w| / max|w| per group of 2: [.5 1 .5 1], [1 1 1 1]
    assert torch.allclose(w_mean, torch.tensor([0.75, 1.0, 0.75, 1.0], dtype=torch.float64))
    x_mean = torch.tensor([1.0, 4.0, 9.0, 16.0])
    scale = awq_scales(x_mean, 0.5, w_mean)
    raw = x_mean.double().sqrt() / (w_mean.sqrt() + 1e-4)
    assert torch.allclose(scale, raw / (raw.max() * raw.min()).sqrt())
    assert torch.allclose(awq_scales(x_mean, 0.5), x_mean.double().sqrt() / 2)   # without: x_mean^a alone (1..4 / 2)


def test_the_search_shortcuts_change_no_decision(monkeypatch):
    """Two shortcuts of the block search: a lone consumer whose own output is the block's (o_proj, down_proj)
    reads its block error from its input Hessian instead of running the batches, and a candidate stops
    running batches once its error reaches the best so far. With both undone (every block output run on
    every batch) the scales, clips and weights are bit for bit the same and the errors agree to float
    rounding, with fewer batches run."""
    import math

    from fxcompress.calibration.sequential import Probe
    from fxcompress.passes import scale_channels as sc

    gm, x, _ = _exported_llama(2, 1)
    cal = [(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    config = ScaleChannels(bits=3, group_size=16, select=r"model\.layers\..*")
    batches = [0]
    each = Probe.each

    def counted(self, node):
        for value in each(self, node):
            batches[0] += 1
            yield value

    monkeypatch.setattr(Probe, "each", counted)
    fast = fxcompress.compile(gm, [config], (x,), calibration_data=cal)
    fast_batches, batches[0] = batches[0], 0

    inspect, error = ScaleChannels._inspect, sc.Inspected.error

    def run_every_block(self, gm, consumers, stats, probe):
        inspected, why = inspect(self, gm, consumers, stats, probe)
        if isinstance(inspected, sc.OwnOutput):
            inspected = sc.Inspected(inspected.node, probe.run(inspected.node), probe)
        return inspected, why

    monkeypatch.setattr(ScaleChannels, "_inspect", run_every_block)
    monkeypatch.setattr(sc.Inspected, "error", lambda self, w, c, bound=math.inf: error(self, w, c))
    slow = fxcompress.compile(gm, [config], (x,), calibration_data=cal)
    assert fast_batches < batches[0]
    for name, tensor in slow.state_dict().items():
        assert torch.equal(fast.state_dict()[name], tensor), name
    reports = [fxcompress.history(out)[-1].stats["layers"] for out in (fast, slow)]
    owns = 0
    for name, report in reports[1].items():
        got = reports[0][name]
        assert got["alpha"] == report["alpha"] and got["inspected"] == report["inspected"], name
        assert got["error"] == pytest.approx(report["error"], rel=1e-5), name
        assert got["error_plain"] == pytest.approx(report["error_plain"], rel=1e-5), name
        if "kept" in report.get("clip", {}):
            assert got["clip"]["kept"] == report["clip"]["kept"], name
            for key in ("block_error_clipped", "block_error_unclipped"):
                assert got["clip"][key] == pytest.approx(report["clip"][key], rel=1e-5), (name, key)
        owns += name.endswith(("o_proj", "down_proj"))
    assert owns == 4
