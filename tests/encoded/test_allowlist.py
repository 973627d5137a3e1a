import torch

import fxcompress
from fxcompress.encoded.allowlist import fxcompress_modules
from fxcompress.integer import IntegerLayer, QuantizeInput
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger
from fxcompress.quant import ActivationQuant
from fxcompress.zoo import LeNet5


def _activation_quantized(x):
    return fxcompress.compile(LeNet5().eval(), [InsertFakeQuant(method="linear", bits=8,
                                                                 activations=ActivationConfig(observer="percentile"))],
                              example_inputs=(x[:2],), calibration_data=[x])


def test_every_fxcompress_module_type_is_named_by_its_qualified_name():
    table = fxcompress_modules()
    assert table["fxcompress.integer.IntegerLayer"] is IntegerLayer
    assert table["fxcompress.quant.modules.ActivationQuant"] is ActivationQuant
    assert all(hasattr(cls, "config") for cls in table.values())


def test_activation_fake_quant_and_integer_models_round_trip(tmp_path):
    x = torch.rand(16, 1, 28, 28)
    fq = _activation_quantized(x)
    integer = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))
    for name, gm in (("fake_quant", fq), ("integer", integer)):
        path = tmp_path / f"{name}.fxc"
        fxcompress.save(gm, path, deterministic=False)  # keeps the timings, so the history compares equal
        loaded = fxcompress.load(path)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), gm.eval()(x)), name
        assert fxcompress.history(loaded) == fxcompress.history(gm)
    assert any(isinstance(m, QuantizeInput) for m in fxcompress.load(tmp_path / "integer.fxc").modules())


def test_switched_off_quantization_and_frozen_observers_survive_a_round_trip(tmp_path):
    from fxcompress.quant import freeze_observers, set_quantization
    x = torch.rand(16, 1, 28, 28)
    gm = _activation_quantized(x)
    set_quantization(gm, False, activations=False)  # float weights, quantized activations
    freeze_observers(gm)
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    flags = [(type(m).__name__, m.enabled, getattr(m, "observing", None))
             for m in loaded.modules() if hasattr(m, "enabled")]
    assert flags == [(type(m).__name__, m.enabled, getattr(m, "observing", None))
                     for m in gm.modules() if hasattr(m, "enabled")]
    assert any(not enabled for _, enabled, _ in flags) and all(o is not True for _, _, o in flags)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
