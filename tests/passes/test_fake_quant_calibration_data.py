"""Calibration data that cannot give activation grids is refused: batches holding NaN or Inf, or no batch at all."""
import pytest
import torch

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.passes import ActivationConfig, InsertFakeQuant
from fxcompress.quant import calibrate
from fxcompress.zoo import LeNet300100


def compile_lenet(calibration, activations=ActivationConfig(), **options):
    x = torch.randn(8, 1, 28, 28)
    return fxcompress.compile(LeNet300100().eval(), [InsertFakeQuant(activations=activations, **options)],
                              example_inputs=(x,), calibration_data=calibration)


def clean_batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 1, 28, 28, generator=g) for _ in range(n)]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile"])
def test_a_non_finite_calibration_batch_is_refused_naming_the_quantizer_and_the_batch(observer, value):
    data = clean_batches()
    data[1][2, 0, 5, 5] = value
    with pytest.raises(PreconditionError, match=r"batch 1 .*'fc1\.input_quant'.*NaN or Inf"):
        compile_lenet(data, ActivationConfig(observer=observer))


def test_an_activation_overflowing_inside_the_model_names_the_quantizer_it_reaches():
    data = clean_batches()
    data[2] = torch.full_like(data[2], 3e38)  # finite input; fc1's output overflows to Inf
    with pytest.raises(PreconditionError, match=r"batch 2 .*'fc2\.input_quant'"):
        compile_lenet(data)


def test_recalibrating_on_a_nan_batch_names_the_quantizer_and_the_batch():
    gm = compile_lenet(clean_batches())
    bad = clean_batches(1)[0]
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(PreconditionError, match=r"batch 3 .*'fc1\.input_quant'"):
        calibrate(gm, clean_batches() + [bad])
    assert torch.isfinite(gm.get_submodule("fc1.input_quant").grid().scale).all()


def test_calibration_data_yielding_no_batch_is_refused():
    with pytest.raises(PreconditionError, match="calibration_data yielded no batches.*generator"):
        compile_lenet([])
    batches = iter(clean_batches())
    list(batches)  # used up, as after an earlier pass
    with pytest.raises(PreconditionError, match="calibration_data yielded no batches"):
        compile_lenet(batches)
    # weights only: no calibration, so no batch is needed
    gm = compile_lenet([], activations=None)
    assert "calibration_batches" not in fxcompress.history(gm)[-1].stats
