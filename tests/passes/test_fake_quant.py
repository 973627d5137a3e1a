import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import chain_transforms, effective_weight, find_layers, layer_node, weight_arg
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks
from layer_cases import TiedHead
from fxcompress.quant import (ActivationQuant, GridWeight, KMeansWeight, freeze_observers, recluster,
                              set_quantization)
from fxcompress.zoo import ZOO, LeNet5, LeNet300100


def lenet300(passes, calibration=None, model=None):
    model = model or LeNet300100().eval()
    x = torch.randn(8, 1, 28, 28)
    return model, x, fxcompress.compile(model, passes, example_inputs=(x,), calibration_data=calibration)


def weights_by_layer(gm):
    return {layer.name: effective_weight(gm, layer) for layer in find_layers(gm)}


def test_kmeans_after_masks_composes_on_the_weight_chain():
    model, x, gm = lenet300([InsertMasks(sparsity=0.9), InsertFakeQuant(bits=4)])
    for layer in find_layers(gm):
        node = layer_node(gm, layer)
        quant = weight_arg(node)
        assert quant.op == "call_module" and quant.target == f"{layer.weight}_quant"
        assert quant.args[0].target is operator.mul  # fake-quant comes after the mask
        assert [type(t) for t in chain_transforms(gm, node)] == [KMeansWeight]
        mask = gm.get_buffer(f"{layer.weight}_mask")
        weight = effective_weight(gm, layer)
        assert torch.all(weight[mask == 0] == 0)  # pruned weights stay exactly zero
        assert torch.all(weight[mask == 1] != 0)  # and no kept weight snaps to zero
        assert torch.unique(weight).numel() <= 16
    record = fxcompress.history(gm)[-1]
    assert record.name == "InsertFakeQuant" and record.stats["fc1"]["levels"] <= 16
    assert set(record.params_touched) == {"fc1.weight", "fc2.weight", "fc3.weight"}


@pytest.mark.parametrize("method, bits", [("linear", 1), ("linear", 8), ("fixed_point", 6), ("kmeans", 1),
                                          ("kmeans", 16), ("fixed_point", 16)])
def test_every_method_bounds_the_levels_and_keeps_zeros(method, bits):
    model, x, gm = lenet300([InsertMasks(sparsity=0.5), InsertFakeQuant(bits=bits, method=method)])
    for layer in find_layers(gm):
        weight = effective_weight(gm, layer)
        assert torch.unique(weight).numel() <= 2 ** bits
        assert torch.all(weight[gm.get_buffer(f"{layer.weight}_mask") == 0] == 0)
    assert torch.isfinite(gm(x)).all()


def test_per_channel_on_convolutions():
    model = LeNet5().eval()
    x = torch.randn(2, 1, 28, 28)
    gm = fxcompress.compile(model, [InsertFakeQuant(bits=3, per_channel=True, types=(nn.Conv2d,))],
                            example_inputs=(x,))
    quantized = [layer for layer in find_layers(gm) if chain_transforms(gm, layer_node(gm, layer))]
    assert [layer.name for layer in quantized] == ["conv1", "conv2"]
    assert gm.get_submodule("conv2.weight_quant").codebook.shape == (50, 8)
    for channel in effective_weight(gm, quantized[1]):
        assert torch.unique(channel).numel() <= 8


def test_switching_quantization_off_and_on_on_the_same_module():
    model, x, gm = lenet300([InsertMasks(sparsity=0.7), InsertFakeQuant(bits=2, activations=ActivationConfig())],
                            calibration=[torch.randn(8, 1, 28, 28) for _ in range(2)])
    masked, _, masked_gm = lenet300([InsertMasks(sparsity=0.7)], model=model)
    quantized = gm(x)
    assert set_quantization(gm, False) == 6
    assert torch.allclose(gm(x), masked_gm(x), atol=1e-6)  # the float (pruned) model
    set_quantization(gm, True)
    assert torch.equal(gm(x), quantized)
    set_quantization(gm, False, activations=False)
    assert not torch.equal(gm(x), quantized)


def test_activation_fake_quant_is_calibrated_then_frozen_or_trained():
    data = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    _, x, gm = lenet300([InsertFakeQuant(bits=8, activations=ActivationConfig(bits=4))], calibration=data)
    record = fxcompress.history(gm)[-1]
    assert record.stats["calibration_batches"] == 3
    assert record.stats["activation_quant"] == ["fc1.input_quant", "fc2.input_quant", "fc3.input_quant"]
    first = gm.get_submodule("fc1.input_quant")
    flat = torch.cat([d.flatten(1) for d in data])
    assert first.observer.range() == (float(flat.min()), float(flat.max()))
    gm.train()(x * 10)
    assert first.observer.range() == (float(flat.min()), float(flat.max()))  # frozen
    freeze_observers(gm, False)
    gm.train()(x * 10)
    assert first.observer.range()[1] > float(flat.max())  # QAT: the grid follows the data
    assert torch.unique(first(x).detach()).numel() <= 16


def test_activations_need_calibration_data():
    with pytest.raises(PreconditionError, match="calibration"):
        lenet300([InsertFakeQuant(activations=ActivationConfig())])


def test_centroid_fine_tuning_trains_only_the_codebooks():
    torch.manual_seed(0)
    model, x, gm = lenet300([InsertMasks(sparsity=0.8), InsertFakeQuant(bits=3)])
    target = torch.randint(0, 10, (8,))
    codes = {name: m.codes.clone() for name, m in gm.named_modules() if isinstance(m, KMeansWeight)}
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(gm(x), target)
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0] * 0.8
    assert gm.get_parameter("fc1.weight").grad is None  # the float weight is not trained
    for name, module in gm.named_modules():
        if isinstance(module, KMeansWeight):
            assert torch.equal(module.codes, codes[name])
            assert module.codebook.grad is not None
    for layer in find_layers(gm):
        weight = effective_weight(gm, layer)
        assert torch.all(weight[gm.get_buffer(f"{layer.weight}_mask") == 0] == 0)
        assert torch.unique(weight).numel() <= 8


RULES_TEXT = """# parameter  method  bits  option
fc1\\.weight   kmeans       6  density
fc2\\.weight   linear       8  symmetric
fc3\\.weight   float        8
"""


@pytest.mark.parametrize("form", ["list", "text", "json", "yaml"])
def test_rules_choose_per_layer(form, tmp_path):
    rules = [("fc1\\.weight", "kmeans", 6, "density"), ("fc2\\.weight", "linear", 8, "symmetric"),
             ("fc3\\.weight", "float", 8)]
    if form == "text":
        (tmp_path / "quant.rule").write_text(RULES_TEXT)
        rules = str(tmp_path / "quant.rule")
    elif form == "json":
        import json
        (tmp_path / "quant.json").write_text(json.dumps([list(r) for r in rules]))
        rules = tmp_path / "quant.json"
    elif form == "yaml":
        pytest.importorskip("yaml")
        (tmp_path / "quant.yaml").write_text("- {pattern: 'fc1\\.weight', method: kmeans, bits: 6, option: density}\n"
                                             "- ['fc2\\.weight', linear, 8, symmetric]\n"
                                             "- ['fc3\\.weight', float, 8]\n")
        rules = tmp_path / "quant.yaml"
    _, _, gm = lenet300([InsertFakeQuant(rules=rules)])
    fc1, fc2 = gm.get_submodule("fc1.weight_quant"), gm.get_submodule("fc2.weight_quant")
    assert isinstance(fc1, KMeansWeight) and fc1.bits == 6
    assert isinstance(fc2, GridWeight) and fc2.symmetric and fc2.bits == 8
    assert not hasattr(gm.get_submodule("fc3"), "weight_quant")


@pytest.mark.parametrize("rules, match", [
    ([("fc1\\.weight", "kmeans", 6, "nearest")], "rules\\[0\\]: the k-means option"),
    ([("fc1\\.weight", "linear", 6, "skewed")], "linear option"),
    ([("fc1\\.weight", "fixed_point", 6, "two")], "fixed_point option"),
    ([("fc1\\.weight", "linear", 1, "symmetric")], "bits >= 2"),
    ([("fc1\\.weight", "kmean", 6)], "method"),
    ([("fc1\\.weight", "kmeans", 17)], "bits"),
])
def test_bad_rules_name_the_rule(rules, match):
    with pytest.raises(ConfigError, match=match):
        InsertFakeQuant(rules=rules)


def test_a_rule_matching_no_layer_is_an_error():
    with pytest.raises(ConfigError, match="matches no name"):
        lenet300([InsertFakeQuant(rules=[("conv9\\.weight", "kmeans", 4)])])


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": 4.0}, "bits"), ({"method": "uniform"}, "method"),
    ({"init": "random"}, "init"), ({"method": "linear", "symmetric": True, "bits": 1}, "bits >= 2"),
    ({"select": "fc[1"}, "select"), ({"types": ("dense",)}, "types"), ({"types": nn.ReLU}, "types"), ({"activations": {"bits": 8}}, "activations"),
    ({"per_channel": "yes"}, "per_channel"), ({"int_bits": -1, "method": "fixed_point"}, "int_bits"),
])
def test_bad_configuration_raises_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        InsertFakeQuant(**kwargs)
    with pytest.raises(ConfigError, match="observer"):
        ActivationConfig(observer="mean")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_naming_the_layer(bad):
    model = LeNet300100().eval()
    with torch.no_grad():
        model.fc2.weight[3, 3] = bad
    with pytest.raises(PreconditionError, match="layer 'fc2'.*1 of 30000 values are NaN/Inf"):
        lenet300([InsertFakeQuant(bits=4)], model=model)


def test_quantizing_again_replaces_the_fake_quant():
    _, x, gm = lenet300([InsertMasks(sparsity=0.5), InsertFakeQuant(bits=6)])
    gm = fxcompress.compile(gm, [InsertFakeQuant(bits=2, method="linear")], example_inputs=(x,))
    node = layer_node(gm, find_layers(gm)[0])
    assert [type(t) for t in chain_transforms(gm, node)] == [GridWeight]
    assert torch.unique(effective_weight(gm, find_layers(gm)[0])).numel() <= 4


def test_recluster_reassigns_from_the_float_weights():
    _, x, gm = lenet300([InsertMasks(sparsity=0.5), InsertFakeQuant(bits=3)])
    module = gm.get_submodule("fc1.weight_quant")
    before = module.codes.clone()
    with torch.no_grad():
        gm.get_parameter("fc1.weight").mul_(torch.rand_like(gm.get_parameter("fc1.weight")) * 2)
    assert recluster(gm) == 3
    assert not torch.equal(module.codes, before)
    weight = effective_weight(gm, find_layers(gm)[0])
    assert torch.all(weight[gm.get_buffer("fc1.weight_mask") == 0] == 0)


def test_state_dict_restores_a_quantized_model():
    passes = [InsertMasks(sparsity=0.6), InsertFakeQuant(bits=4, activations=ActivationConfig())]
    data = [torch.randn(8, 1, 28, 28)]
    model, x, gm = lenet300(passes, calibration=data)
    _, _, other = lenet300(passes, calibration=[torch.randn(8, 1, 28, 28) * 3], model=LeNet300100().eval())
    other.load_state_dict(gm.state_dict())
    assert torch.equal(other(x), gm(x))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_compiles_and_stays_close(name):
    make_model, make_input = ZOO[name]
    model = make_model().eval()
    x = make_input()
    gm = fxcompress.compile(model, [InsertFakeQuant(bits=8)], example_inputs=(x,))
    assert len([m for m in gm.modules() if isinstance(m, KMeansWeight)]) == len(find_layers(gm))
    with torch.no_grad():
        reference, out = model(x), gm(x)
    assert torch.allclose(out, reference, atol=0.05 * float(reference.abs().max()) + 1e-4)


def test_conv_transpose_per_channel_uses_the_output_channel_axis():
    model = nn.Sequential(nn.ConvTranspose2d(3, 6, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 5, 5)
    gm = fxcompress.compile(model, [InsertFakeQuant(bits=2, per_channel=True, method="linear")],
                            example_inputs=(x,))
    module = gm.get_submodule("0.weight_quant")
    assert module.axis == 1 and module.grid(gm.get_parameter("0.weight")).scale.shape == (6,)


def test_activation_modules_of_layers_reading_one_value_are_shared():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 2)])

        def forward(self, x):
            return torch.cat([head(x) for head in self.heads], dim=1)

    x = torch.randn(5, 4)
    gm = fxcompress.compile(Fork(), [InsertFakeQuant(activations=ActivationConfig())], example_inputs=(x,),
                            calibration_data=[x])
    assert len([m for m in gm.modules() if isinstance(m, ActivationQuant)]) == 1


# k-means at 5 bits and fixed point at 8 bits are lowered after masks, and checked equal, by
# test_lower_encoded.py::test_the_deep_compression_passes_lower_bit_identically; a 4-bit grid is not.
@pytest.mark.parametrize("quant", [InsertFakeQuant(bits=4, method="linear", per_channel=True)])
def test_lowering_reproduces_the_fake_quant_outputs_exactly(quant):
    from fxcompress.passes import LowerToEncoded

    _, x, gm = lenet300([InsertMasks(sparsity=0.9), quant])
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    assert torch.equal(lowered(x), gm(x))


def test_calibration_shows_progress_when_asked(capsys):
    model = LeNet300100().eval()
    x = torch.randn(4, 1, 28, 28)
    fxcompress.compile(model, [InsertFakeQuant(activations=ActivationConfig(observer="percentile"))],
                       example_inputs=(x,), calibration_data=[x, (x,)], progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_selecting_no_layer_is_an_error():
    with pytest.raises(ConfigError, match="selects no layer.*fc1"):
        lenet300([InsertFakeQuant(select="conv.*")])


@pytest.mark.parametrize("make, field", [
    (lambda: InsertFakeQuant(per_channel=1), "InsertFakeQuant.per_channel must be True or False, got 1"),
    (lambda: InsertFakeQuant(symmetric=0.0, method="linear"), "InsertFakeQuant.symmetric must be True or False"),
    (lambda: InsertFakeQuant(fix_zeros=None), "InsertFakeQuant.fix_zeros must be True or False, got None"),
    (lambda: ActivationConfig(symmetric=1), "ActivationConfig.symmetric must be True or False"),
    (lambda: ActivationConfig(freeze="no"), "ActivationConfig.freeze must be True or False, got 'no'"),
])
def test_boolean_fields_take_only_booleans(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kmeans", "int_bits": 3}, r"int_bits=3 does not apply to method 'kmeans'.*'fixed_point'"),
    ({"method": "kmeans", "symmetric": True}, r"symmetric=True does not apply to method 'kmeans'.*'linear'"),
    ({"method": "fixed_point", "symmetric": True}, r"symmetric=True does not apply to method 'fixed_point'"),
    ({"method": "linear", "int_bits": 2}, r"int_bits=2 does not apply to method 'linear'"),
    ({"method": "linear", "init": "forgy"}, r"init='forgy' does not apply to method 'linear'.*'kmeans'"),
    ({"method": "fixed_point", "seed": 3}, r"seed=3 does not apply to method 'fixed_point'"),
    ({"method": "linear", "fix_zeros": False}, r"fix_zeros=False does not apply to method 'linear'"),
    ({"rules": [("fc1\\.weight", "kmeans", 4)], "bits": 5}, r"bits=5 does not apply with rules.*rules\[0\] says"),
    ({"rules": [("fc1\\.weight", "linear", 4), ("fc2\\.weight", "kmeans", 4)], "method": "linear"},
     r"method='linear' does not apply with rules: each rule gives its layer's method and bits, and InsertFakeQuant.rules\[1\] says otherwise"),
    ({"rules": [("fc1\\.weight", "kmeans", 4)], "int_bits": 2}, r"int_bits=2 does not apply to method 'kmeans'"),
])
def test_a_field_the_method_does_not_read_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InsertFakeQuant(**kwargs)


def test_method_and_bits_may_restate_what_every_rule_says():
    rules = [("fc1\\.weight", "linear", 6), ("fc2\\.weight", "linear", 6), ("fc3\\.weight", "float", 8)]
    _, _, gm = lenet300([InsertFakeQuant(method="linear", bits=6, rules=rules)])
    assert gm.get_submodule("fc2.weight_quant").bits == 6 and not hasattr(gm.get_submodule("fc3"), "weight_quant")


@pytest.mark.parametrize("option, value, reader, other", [("momentum", 0.5, "moving_average", "minmax"),
                                                         ("percentile", 99.5, "percentile", "moving_average")])
def test_an_observer_option_the_observer_does_not_read_is_refused(option, value, reader, other):
    with pytest.raises(ConfigError, match=rf"ActivationConfig.{option}={value} does not apply to observer '{other}'"):
        ActivationConfig(observer=other, **{option: value})
    assert getattr(ActivationConfig(observer=reader, **{option: value}), option) == value


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "fixed_point", "bits": 8, "int_bits": 20}, r"InsertFakeQuant.int_bits must be in \[0, 8\], got 20"),
    ({"rules": [("fc1\\.weight", "fixed_point", 4, 9)]}, r"rules\[0\].int_bits must be in \[0, 4\], got 9"),
])
def test_int_bits_beyond_the_word_are_refused_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InsertFakeQuant(**kwargs)


def test_a_fixed_point_grid_that_zeroes_every_weight_is_refused():
    # step 2^(8 - 8) = 1 against weights below 0.1: every weight would round to 0
    with pytest.raises(PreconditionError, match=r"layer 'fc1' \(fixed_point, bits=8, int_bits=8\): the grid's "
                                                r"step 1 rounds every weight to 0 \(largest \|w\| is 0\.0"):
        lenet300([InsertFakeQuant(method="fixed_point", bits=8, int_bits=8)])


def test_grid_statistics_count_zeroed_and_saturated_weights():
    model = LeNet300100().eval()
    with torch.no_grad():
        model.fc1.weight[0, :3] = torch.tensor([5.0, -5.0, 0.9])  # int_bits=1 holds [-1, 1): two saturate
    _, _, gm = lenet300([InsertFakeQuant(method="fixed_point", bits=6, int_bits=1)], model=model)
    stats = fxcompress.history(gm)[-1].stats
    for layer in find_layers(gm):
        float_weight = gm.get_parameter(layer.weight).detach()
        zeroed = int(((float_weight != 0) & (effective_weight(gm, layer) == 0)).sum())
        assert stats[layer.name]["zeroed"] == zeroed > 0
    assert stats["fc1"]["saturated"] == 2 and stats["fc2"]["saturated"] == 0
    assert effective_weight(gm, find_layers(gm)[0])[0, :2].tolist() == [0.96875, -1.0]  # clamped to the word


def test_a_fixed_point_rule_without_option_takes_the_pass_int_bits():
    _, _, gm = lenet300([InsertFakeQuant(rules=[("fc1\\.weight", "fixed_point", 8)], int_bits=1)])
    assert gm.get_submodule("fc1.weight_quant").int_bits == 1


def _gradients_after_one_backward(gm, x):
    gm.train()
    gm.zero_grad()
    gm(x).square().sum().backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for name, p in gm.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_of_a_kmeans_model_gets_a_gradient():
    """What DistributedDataParallel checks: no trainable parameter may be left out of the loss."""
    _, x, gm = lenet300([InsertMasks(sparsity=0.8), InsertFakeQuant(bits=3)])
    graded = _gradients_after_one_backward(gm, x)
    assert graded and all(graded.values()), graded
    assert {name for name in graded if name.endswith("codebook")} == {f"fc{i}.weight_quant.codebook" for i in (1, 2, 3)}
    for i in (1, 2, 3):  # the float weights stay (re-clustering reads them) but are frozen
        assert not gm.get_parameter(f"fc{i}.weight").requires_grad
    set_quantization(gm, False)  # the float model: its weights train again
    graded = _gradients_after_one_backward(gm, x)
    assert all(graded.values()) and {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(graded)
    set_quantization(gm, True)
    assert not any(gm.get_parameter(f"fc{i}.weight").requires_grad for i in (1, 2, 3))
    assert all(_gradients_after_one_backward(gm, x).values())


def test_grid_methods_keep_the_float_weights_trainable():
    _, x, gm = lenet300([InsertFakeQuant(bits=4, method="linear")])
    graded = _gradients_after_one_backward(gm, x)
    assert {"fc1.weight", "fc2.weight", "fc3.weight"} <= set(graded) and all(graded.values())


@pytest.mark.parametrize("per_channel", [False, True])
def test_kmeans_statistics_from_the_codes_equal_those_of_the_whole_quantized_weight(per_channel):
    import math
    from fxcompress.passes import fake_quant
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400)).eval()  # 120,000 weights: two chunks, the second cut short
    x = torch.randn(2, 300)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.7), InsertFakeQuant(bits=3, per_channel=per_channel)],
                            example_inputs=(x,))
    stats = fxcompress.history(gm)[-1].stats["0"]
    module = next(m for m in gm.modules() if isinstance(m, KMeansWeight))
    masked = gm.get_parameter("0.weight").detach() * gm.get_buffer("0.weight_mask")
    with torch.no_grad():
        quantized = module(masked)  # the whole decoded layer, as the statistics were computed before
    noise = float(((masked.double() - quantized.double()) ** 2).sum())
    expected_db = 10 * math.log10(float((masked.double() ** 2).sum()) / noise)
    assert stats["levels"] == int(torch.unique(quantized).numel()) and 2 <= stats["levels"] <= 8 * (400 if per_channel else 1)
    assert stats["sqnr_db"] == pytest.approx(round(expected_db, 2), abs=0.011)
    pairs = fake_quant._pair_stats(fake_quant._chunks(masked, quantized))  # the chunked sums as before, exactly
    assert {k: stats[k] for k in ("levels", "sqnr_db")} == pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_statistics_count_levels_as_torch_unique_does_and_leave_the_weight_unchanged(dtype):
    """The levels count takes numpy's sort where it gives torch.unique's set (float32 / float64 without
    NaN, 4096 values or more: the first chunk here), torch.unique elsewhere (the short second chunk); the
    SQNR sums are the float64 formula's. Checked against the formula written out with torch.unique on
    weights holding -0.0 and 0.0, and with NaNs (each its own level)."""
    import math
    from fxcompress.passes import fake_quant
    torch.manual_seed(0)
    weight = torch.randn((1 << 16) + 300).to(dtype)  # two chunks, the second cut short
    weight[:3], weight[3] = 0.0, -0.0
    quantized = GridWeight(3, "linear", False, None, None)(weight)
    kept = weight.clone()
    noise = float(((weight.double() - quantized.double()) ** 2).sum())
    expected_db = round(10 * math.log10(float((weight.double() ** 2).sum()) / noise), 2)
    pairs = fake_quant._pair_stats(fake_quant._chunks(weight, quantized))
    assert pairs == {"levels": int(torch.unique(quantized).numel()), "sqnr_db": expected_db}
    assert torch.equal(weight, kept)  # the float64 difference is worked in place on a copy, even of a float64 weight
    with_nans = quantized.clone()
    with_nans[[1, 7, (1 << 16) + 5]] = float("nan")
    levels = fake_quant._pair_stats(fake_quant._chunks(weight, with_nans))["levels"]
    assert levels == int(torch.unique(with_nans).numel()) == int(torch.unique(quantized).numel()) + 3


class _ResidualOverTwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x, t):
        return (self.conv(x) + x).flatten(1)[:, :2] + self.fc(t)


def test_a_join_reading_the_first_input_quantizes_it_after_every_input(tmp_path):
    """The add's operand x is the first input: its grid goes after the last input (it had landed between the two
    placeholders, and the saved model did not load)."""
    torch.manual_seed(0)
    x, t = torch.randn(8, 3, 4, 4), torch.randn(8, 4)
    quantize = InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig(bits=8, joins=True))
    gm = fxcompress.compile(_ResidualOverTwoInputs().eval(), [quantize], example_inputs=(x, t),
                            calibration_data=[(x, t)])
    ops = [n.op for n in gm.graph.nodes]
    assert ops[:2] == ["placeholder", "placeholder"] and "placeholder" not in ops[2:]
    add = next(n for n in gm.graph.nodes if n.target is operator.add and n.args[1].op == "call_module")
    assert add.args[1].args == (gm.graph.find_nodes(op="placeholder")[0],)  # x, on its grid
    fxcompress.save(gm, tmp_path / "m.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "m.fxc")(x, t), gm(x, t))


def test_a_rule_for_a_tied_layer_says_it_is_tied():
    # it said the pattern "matches no name", listing names without lm_head.weight, which is in the model
    quant = InsertFakeQuant(rules=[("fc\\.weight", "kmeans", 4), ("lm_head\\.weight", "kmeans", 4)])
    with pytest.raises(ConfigError, match=r"InsertFakeQuant.rules\[1\]: .*'lm_head.weight' only, the weight of layer "
                                          r"'lm_head', which is tied to 'embed'.*write the rule for 'embed.weight'"):
        fxcompress.compile(TiedHead(), [quant], example_inputs=(torch.randint(0, 16, (2, 5)),))
    both = InsertFakeQuant(rules=[("fc\\.weight", "kmeans", 4), ("embed\\.weight", "kmeans", 4)])
    gm = fxcompress.compile(TiedHead(), [both], example_inputs=(torch.randint(0, 16, (2, 5)),))
    assert sorted(fxcompress.history(gm)[-1].params_touched) == ["embed.weight", "fc.weight"]
