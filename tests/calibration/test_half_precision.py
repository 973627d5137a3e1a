"""The calibrated passes on float16 / bfloat16 models, as language models are stored: GPTQ's rounded values are
the levels as the weight's dtype holds them (the module gives those back, and the error carried on is theirs),
and ScaleChannels' fold check allows the half types' rounding. Before, GPTQ raised VerificationError on every
half-precision layer and ScaleChannels refused every fold."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.passes import InsertFakeQuant, ScaleChannels, SparseGPT

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
GPTQ = {
    "groups": dict(method="linear", bits=4, group_size=16),
    "groups act_order": dict(method="linear", bits=4, group_size=16, act_order=True),
    "static groups symmetric": dict(method="linear", bits=4, group_size=16, static_groups=True, symmetric=True),
    "per channel": dict(method="linear", bits=4, per_channel=True),
    "per tensor": dict(method="linear", bits=4, per_channel=False),
    "codebook": dict(method="kmeans", bits=3, fix_zeros=True),
}


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval().to(dtype)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 64, generator=generator).to(dtype) for _ in range(2)]
    return model, batches


@pytest.mark.parametrize("config", GPTQ.values(), ids=GPTQ.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gptq_rounds_half_precision_layers_and_keeps_pruned_weights_zero(dtype, config):
    model, batches = _model(dtype)
    sparse = fxcompress.compile(model, [SparseGPT(granularity="2:4")], (batches[0],), calibration_data=batches)
    for base in (model, sparse):
        gm = fxcompress.compile(base, [InsertFakeQuant(rounding="gptq", **config)], (batches[0],),
                                calibration_data=batches)
        for name, report in fxcompress.history(gm)[-1].stats.items():
            assert report["error_gptq"] < report["error_nearest"], name
            weight = gm.get_parameter(f"{name}.weight")
            assert weight.dtype == dtype
            if base is sparse:
                mask = gm.get_buffer(f"{name}.weight_mask").bool()
                with torch.no_grad():
                    quantized = gm.get_submodule(f"{name}.weight_quant")(weight * mask)
                assert bool((quantized[~mask] == 0).all()), name


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_awq_folds_into_half_precision_producers(dtype):
    model, batches = _model(dtype)
    gm = fxcompress.compile(model, [ScaleChannels(bits=4, group_size=16, clip=False)], (batches[0],),
                            calibration_data=batches)
    assert not torch.equal(gm.get_parameter("0.weight"), model[0].weight)   # the scales folded into fc1
    with torch.no_grad():
        expected, got = model(batches[1]).double(), gm(batches[1]).double()
    # the fold alone (no quantization yet) changes the model only by the half type's rounding
    assert float((got - expected).norm() / expected.norm()) < 20 * torch.finfo(dtype).eps
