"""compressed-tensors export: packing identical to the package's own, every packed layer
decompressed by the package bit-identical to our fake-quant weight, a quantized Llama loaded back
by transformers computing the same logits, a pruned model's dense export, and refusals by name."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.compressed_tensors import pack_int32, to_compressed_tensors
from fxcompress.errors import ConfigError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks
from fxcompress.quant import set_quantization


# compressed-tensors takes over a second to import: imported by the tests that read files back with it,
# not at collection (a missing package still skips them with its reason).
@pytest.fixture(scope="module")
def safetensors():
    return pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def ct(safetensors):
    """The compressed-tensors package's packing helper, compressor and config class."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig
    return SimpleNamespace(compressor=PackedQuantizationCompressor, pack_to_int32=pack_to_int32,
                           config=QuantizationConfig, safetensors=safetensors)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_matches_the_package_along_both_dims(bits, ct):
    torch.manual_seed(bits)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 83), dtype=torch.int8)   # 83: a ragged tail
    assert torch.equal(pack_int32(values, bits), ct.pack_to_int32(values, bits))
    assert torch.equal(pack_int32(values.T, bits).T, ct.pack_to_int32(values, bits, packed_dim=0))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _decompressed(ct, directory) -> dict[str, torch.Tensor]:
    """Every packed layer's weight as the compressed-tensors package decompresses it."""
    config = ct.config.model_validate(json.loads((directory / "config.json").read_text())["quantization_config"])
    tensors = ct.safetensors.load_file(directory / "model.safetensors")
    out = {}
    for scheme in config.config_groups.values():
        for target in scheme.targets:
            own = {k[len(target) + 1:]: v for k, v in tensors.items() if k.startswith(target + ".weight_")}
            out[target] = ct.compressor.decompress(own, scheme)["weight"]
    return out


def test_package_decompresses_every_layer_bit_exactly(tmp_path, ct):
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertMasks(sparsity=0.5),
                                     InsertFakeQuant(method="linear", bits=4, group_size=32, select="[02]"),
                                     InsertFakeQuant(method="linear", bits=8, per_channel=True, symmetric=True,
                                                     select="4")], (x,))
    report = to_compressed_tensors(gm, tmp_path)
    assert report["packed_layers"] == ["0", "2", "4"]
    weights = _decompressed(ct, tmp_path)
    layers = {layer.name: layer for layer in find_layers(gm)}
    assert set(weights) == {"0", "2", "4"}
    for name, weight in weights.items():
        assert torch.equal(weight, effective_weight(gm, layers[name])), name
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["strategy"]) for g in groups.values()) == [
        (4, "group"), (8, "channel")]
    stored = ct.safetensors.load_file(tmp_path / "model.safetensors")
    assert stored["0.weight_packed"].shape == (128, 64 * 4 // 32) and stored["0.weight_packed"].dtype == torch.int32
    assert "4.weight_zero_point" not in stored and not any("mask" in k or "quant" in k for k in stored)


def test_transformers_loads_a_w4a16_llama_with_the_same_logits(tmp_path, ct):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, use_cache=False,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 16))
    gm = fxcompress.compile(torch.export.export(model, (x,), strict=False),
                            [InsertFakeQuant(method="linear", bits=4, group_size=32, symmetric=True,
                                             select=r"model\.layers\..*")], (x,))
    report = to_compressed_tensors(gm, tmp_path, config=model.config.to_dict())
    assert len(report["packed_layers"]) == 7 and report["tied_skipped"] == ["lm_head.weight"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, gm(x)["logits"])
        plain = model(x).logits
    assert not torch.equal(plain, gm(x)["logits"].detach())   # the 4-bit weights really are what was loaded


def test_dense_export_of_a_pruned_model_keeps_its_zeros(tmp_path, safetensors):
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertMasks(sparsity=0.75)], (x,))
    to_compressed_tensors(gm, tmp_path, format="dense", config={"model_type": "mlp"})
    stored = safetensors.load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "mlp"}
    for layer in find_layers(gm):
        weight = stored[layer.weight]
        assert torch.equal(weight, effective_weight(gm, layer))
        assert float((weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    assert not any("mask" in k for k in stored)


def test_refusals_name_the_layer(tmp_path, safetensors):
    x = torch.randn(4, 64)
    with pytest.raises(ConfigError, match="format='zip'"):
        to_compressed_tensors(fxcompress.compile(_mlp(), [], (x,)), tmp_path, format="zip")
    kmeans = fxcompress.compile(_mlp(), [InsertFakeQuant(method="kmeans", bits=4, select="2")], (x,))
    with pytest.raises(ConfigError, match="layer '2'.*KMeansWeight"):
        to_compressed_tensors(kmeans, tmp_path)
    per_tensor = fxcompress.compile(_mlp(), [InsertFakeQuant(method="linear", bits=4, select="0")], (x,))
    with pytest.raises(ConfigError, match="layer '0'.*per-tensor"):
        to_compressed_tensors(per_tensor, tmp_path)
    to_compressed_tensors(kmeans, tmp_path / "dense", format="dense")   # the float values are always writable


def test_activation_fake_quant_is_refused_not_dropped(tmp_path, safetensors):
    # the checkpoint cannot hold input fake-quant: written without it, it would compute with float activations
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertFakeQuant(method="linear", bits=4, per_channel=True,
                                                     activations=ActivationConfig(bits=8))], (x,), calibration_data=[x])
    for format in ("pack-quantized", "dense"):
        with pytest.raises(ConfigError, match=r"activations are fake-quantized \(first: '0.input_quant'"):
            to_compressed_tensors(gm, tmp_path / format, format=format)
        assert not (tmp_path / format).exists()
    set_quantization(gm, False)   # the float model: nothing of the grids is left to write
    assert to_compressed_tensors(gm, tmp_path / "float")["packed_layers"] == []


def test_a_disabled_quantizer_is_written_as_the_float_weight_it_computes_with(tmp_path, ct):
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertMasks(sparsity=0.5),
                                     InsertFakeQuant(method="linear", bits=4, group_size=32)], (x,))
    set_quantization(gm, False)
    report = to_compressed_tensors(gm, tmp_path)
    assert report["packed_layers"] == [] and "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    stored = ct.safetensors.load_file(tmp_path / "model.safetensors")
    for layer in find_layers(gm):
        assert torch.equal(stored[layer.weight], effective_weight(gm, layer))


def test_a_bfloat16_model_loads_back_to_its_fake_quant_weights(tmp_path, ct):
    # compressed-tensors dequantizes in the float32 scales; loading into the bfloat16 model rounds to its weights
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    gm = fxcompress.compile(_mlp().to(torch.bfloat16), [InsertFakeQuant(method="linear", bits=4, group_size=32)], (x,))
    assert to_compressed_tensors(gm, tmp_path)["packed_layers"] == ["0", "2", "4"]
    layers = {layer.name: layer for layer in find_layers(gm)}
    for name, weight in _decompressed(ct, tmp_path).items():
        assert torch.equal(weight.to(torch.bfloat16), effective_weight(gm, layers[name])), name
    assert ct.safetensors.load_file(tmp_path / "model.safetensors")["0.bias"].dtype == torch.bfloat16


def test_asymmetric_eight_bit_channels_with_rules_leaving_a_layer_float(tmp_path, ct):
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertFakeQuant(per_channel=True, rules=[
        ("0.weight", "linear", 8), ("2.weight", "float", 4), ("4.weight", "linear", 3, "symmetric")])], (x,))
    assert to_compressed_tensors(gm, tmp_path)["packed_layers"] == ["0", "4"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["2"]
    assert sorted((g["targets"], g["weights"]["num_bits"], g["weights"]["symmetric"], g["weights"]["strategy"])
                  for g in config["config_groups"].values()) == [(["0"], 8, False, "channel"),
                                                                 (["4"], 3, True, "channel")]
    layers = {layer.name: layer for layer in find_layers(gm)}
    assert {name: torch.equal(w, effective_weight(gm, layers[name]))
            for name, w in _decompressed(ct, tmp_path).items()} == {"0": True, "4": True}
    stored = ct.safetensors.load_file(tmp_path / "model.safetensors")
    assert torch.equal(stored["2.weight"], effective_weight(gm, layers["2"])) and "0.weight_zero_point" in stored


def test_a_stale_quantization_config_is_not_carried_into_a_dense_export(tmp_path, safetensors):
    # the config of a model loaded from a quantized checkpoint: its quantization_config describes other tensors
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertMasks(sparsity=0.5)], (x,))
    to_compressed_tensors(gm, tmp_path, format="dense", config={"model_type": "mlp", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized"}})
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "mlp"}


def test_bad_directories_and_configs_are_refused_and_leave_nothing_behind(tmp_path, safetensors, monkeypatch):
    x = torch.randn(4, 64)
    gm = fxcompress.compile(_mlp(), [InsertFakeQuant(method="linear", bits=4, per_channel=True)], (x,))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="'.*file' is a file, not a directory"):
        to_compressed_tensors(gm, tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot create the directory '.*file/sub'"):
        to_compressed_tensors(gm, tmp_path / "file" / "sub")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(ConfigError, match=r"config\['dtype'\] cannot be written to config.json"):
        to_compressed_tensors(gm, tmp_path / "new" / "out", config={"dtype": torch.float32})
    assert not (tmp_path / "new").exists()
    # a failure while writing: the folders made are removed, an existing one keeps the files it had
    import safetensors.torch as st

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        to_compressed_tensors(gm, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(OSError, match="No space left"):
        to_compressed_tensors(gm, tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["config.json"]
    assert (tmp_path / "old" / "config.json").read_text() == "{}"
    monkeypatch.undo()
    to_compressed_tensors(gm, tmp_path / "old")   # over an existing export: replaced in place
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["config.json", "model.safetensors"]
    assert "quantization_config" in json.loads((tmp_path / "old" / "config.json").read_text())


def _tied_llama(transformers):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, use_cache=False,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_quantized_table_under_a_tied_lm_head_is_refused_packed_and_exported_dense(tmp_path, ct):
    # the head's weight is the embedding table, quantized once, through the embedding (one grid per embedding-dim
    # column, for the head its input channels: no strategy of the format's either): packed, it would exist only as
    # model.embed_tokens.weight_packed, an embedding target the format cannot describe, and leave lm_head, which
    # transformers ties to a `weight`, nothing to load
    transformers = pytest.importorskip("transformers")
    model = _tied_llama(transformers)
    x = torch.randint(0, 64, (2, 16))
    gm = fxcompress.compile(torch.export.export(model, (x,), strict=False),
                            [InsertFakeQuant(method="linear", bits=4, per_channel=True, symmetric=True,
                                             types=("linear", "embedding"))], (x,))
    layers = {layer.name: layer for layer in find_layers(gm)}
    assert layers["lm_head"].tied_to == "model.embed_tokens"
    with pytest.raises(ConfigError, match=r"layer 'lm_head' \(linear\) is tied to 'model.embed_tokens' \(embedding\)"
                                          r".*quantized \(model.embed_tokens.weight_quant: linear, 4 bits\).*"
                                          r"types=\('linear',\).*format='dense'"):
        to_compressed_tensors(gm, tmp_path / "packed", config=model.config.to_dict())
    assert not (tmp_path / "packed").exists()
    # dense: the quantized table written once, as the floats it computes with, and read by the tied head
    report = to_compressed_tensors(gm, tmp_path / "dense", format="dense", config=model.config.to_dict())
    assert report["tied_skipped"] == ["lm_head.weight"]
    stored = ct.safetensors.load_file(tmp_path / "dense" / "model.safetensors")
    table = stored["model.embed_tokens.weight"]
    assert "lm_head.weight" not in stored and torch.equal(table, effective_weight(gm, layers["model.embed_tokens"]))
    assert max(torch.unique(column).numel() for column in table.T) <= 16 and not torch.equal(table, model.lm_head.weight)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()   # still tied
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, gm(x)["logits"])


def test_a_packed_weight_another_layer_reads_tied_is_refused_by_that_layer(tmp_path, safetensors):
    # the tensor's first reader is a linear layer: packed under its name only, the second reader gets no weight
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    gm = fxcompress.compile(Shared(), [InsertFakeQuant(method="linear", bits=4, per_channel=True)], (torch.randn(2, 16),))
    with pytest.raises(ConfigError, match=r"layer 'b' \(linear\) is tied to 'a' \(linear\).*leaves 'b' no weight"):
        to_compressed_tensors(gm, tmp_path)
    assert not tmp_path.joinpath("model.safetensors").exists()
    stored = safetensors.load_file(to_compressed_tensors(gm, tmp_path, format="dense") and tmp_path / "model.safetensors")
    assert list(stored) == ["a.weight"] and torch.unique(stored["a.weight"][0]).numel() <= 16
