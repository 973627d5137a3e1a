"""The pass contract on calibration data (test_pass_contract.py runs the default passes without it).

Every pass, and every mode of a pass, that reads compile's `calibration_data` runs here on every zoo
model with one batch and must either change the model or give the outcome the table below expects:
a calibrated pass that refused or skipped every model would fail here, where without data it only
raises the PreconditionError that test_pass_contract.py expects."""
import pytest
import torch

import fxcompress
import fxcompress.passes as passes
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.pass_base import Pass, PassContext
from fxcompress.passes import InsertFakeQuant, InsertMasks, PruneChannels, ScaleChannels, SparseGPT
from fxcompress.pruning.owl import OWL
from fxcompress.tracing import trace
from fxcompress.zoo import ZOO, LeNet300100

# each calibrated mode: a pass configured to read the calibration data
CALIBRATED = {
    "SparseGPT": SparseGPT(),
    "AWQ": ScaleChannels(),
    "AWQ per channel": ScaleChannels(group_size=None),
    "SmoothQuant": ScaleChannels(method="smoothquant"),
    "GPTQ": InsertFakeQuant(method="linear", rounding="gptq"),
    "Wanda": InsertMasks(importance="wanda"),
    "OWL": InsertMasks(importance="wanda", profile=OWL()),
    "channel refit": PruneChannels(reconstruct=True),
}
# Not here, to keep this file quick: static activation observers (test_pass_contract.py calibrates
# them on every zoo model before LowerToInteger) and PruneChannels' data-driven selection methods
# (tests/channels/test_select.py).

UNCHANGED = "unchanged"  # the pass runs and, rightly, finds nothing to do: its stats say why for each layer
WITH_CONVS = ("lenet5", "vgg_bn", "resnet", "densenet", "mobilenetv2", "senet")
WITHOUT_NORMS = ("lenet300", *WITH_CONVS)  # no linear layer reads a norm or a linear layer directly
# (mode, zoo model) -> what it must do there instead of changing the model
EXPECTED = {
    # the default group_size=128 divides no zoo layer's input features: refused, naming the layer
    **{("AWQ", model): ConfigError for model in ZOO},
    # scales fold only into an op that keeps channels (a norm, a linear layer); a ReLU or a pooling
    # in between leaves the layer unscaled, with that reason (AWQ still clips its weight groups)
    **{("SmoothQuant", model): UNCHANGED for model in WITHOUT_NORMS},
    # second-order updates and input norms read linear layers' inputs: a conv in the selection is refused
    **{(mode, model): ConfigError for mode in ("GPTQ", "Wanda", "OWL") for model in WITH_CONVS},
}


def test_the_table_names_real_modes_and_models():
    assert {mode for mode, _ in EXPECTED} <= set(CALIBRATED)
    assert {model for _, model in EXPECTED} <= set(ZOO)
    assert set(WITH_CONVS) <= set(ZOO)


def test_every_pass_that_needs_calibration_data_has_a_calibrated_mode_here():
    """A public pass whose default refuses to run without calibration data is run here with it."""
    gm = trace(LeNet300100().eval())
    ctx = PassContext(example_inputs=(torch.randn(2, 1, 28, 28),), gm=gm)
    needing = set()
    for name in passes.__all__:
        pass_type = getattr(passes, name)
        if isinstance(pass_type, type) and issubclass(pass_type, Pass):
            try:
                pass_type().requires(gm, ctx)
            except PreconditionError as error:
                needing |= {name} if "calibration" in str(error) else set()
    assert needing == {"ScaleChannels", "SparseGPT"}  # a new one must be added to CALIBRATED
    assert needing <= {type(p).__name__ for p in CALIBRATED.values()}


def _reasons(stats) -> list[str]:
    """Every reason a pass gave for skipping something, wherever its stats keep them."""
    if isinstance(stats, dict):
        return [r for key, value in stats.items()
                for r in ([str(value)] if key == "skipped" and isinstance(value, str) else _reasons(value))]
    return []


@pytest.mark.parametrize("mode", list(CALIBRATED))
def test_calibrated_pass_on_every_zoo_model(mode, zoo_model):
    name, model, inputs = zoo_model
    p, expected = CALIBRATED[mode], EXPECTED.get((mode, name))
    if isinstance(expected, type):
        with pytest.raises(expected, match=type(p).__name__):
            fxcompress.compile(model, [p], example_inputs=inputs, calibration_data=[inputs])
        return
    gm = fxcompress.compile(model, [p], example_inputs=inputs, calibration_data=[inputs])
    record = fxcompress.history(gm)[-1]
    assert record.name == type(p).__name__ and record.config == p.config()
    if expected == UNCHANGED:
        assert not record.changed, f"{mode} changed {name}, listed as having nothing to do"
        assert _reasons(record.stats), f"{mode} did nothing on {name} without saying why: {record.stats}"
        return
    assert record.changed and record.params_touched, f"{mode} did nothing on {name}"
