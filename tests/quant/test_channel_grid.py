"""The one answer to "has this weight grid a per-channel form", and its three readers: LowerToInteger
(tests/passes/test_lower_integer.py), the QDQ ONNX export (tests/onnx/test_export.py) and the
compressed-tensors export (here: which strategy a layer is written with)."""
import pytest
import torch

import fxcompress
from fxcompress.compressed_tensors import packed_layers
from fxcompress.passes import InsertFakeQuant
from fxcompress.quant import GridWeight
from fxcompress.quant.channel_grid import per_channel_grid
from fxcompress.quant.quantizers import quantize


def test_per_tensor_and_per_channel_grids_come_back_as_they_are():
    weight = torch.randn(6, 8)
    for quantizer in (GridWeight(8, symmetric=True), GridWeight(8, axis=0), GridWeight(6, "fixed_point", axis=0)):
        grid, expected = per_channel_grid(quantizer, weight), quantizer.grid(weight)
        assert torch.equal(grid.scale, expected.scale) and grid.group_size is None


def test_groups_that_agree_are_their_channel_grid_and_give_the_same_codes():
    weight = torch.randn(6, 8)
    weight[:, 4:] = weight[:, :4].flip(1)  # both groups of each row span the same range
    grouped = GridWeight(4, axis=0, group_size=4)
    grid = per_channel_grid(grouped, weight)
    assert grid.group_size is None and grid.scale.shape == (6,)
    assert torch.equal(quantize(weight, grid, 0), grouped.codes(weight))
    assert torch.equal(per_channel_grid(GridWeight(4, axis=0, group_size=8), weight).scale,
                       GridWeight(4, axis=0).grid(weight).scale)  # one group per row


def test_groups_that_differ_have_no_channel_form_and_the_reason_names_the_channel():
    weight = torch.randn(6, 8)
    weight[2, 5] = 40.0  # channel 2's second group has a range of its own
    weight[:, 4:] = torch.where(torch.arange(6)[:, None] == 2, weight[:, 4:], weight[:, :4].flip(1))
    reason = per_channel_grid(GridWeight(4, axis=0, group_size=4), weight)
    assert isinstance(reason, str) and "1 output channel(s)" in reason and "first: channel 2" in reason


def test_compressed_tensors_writes_one_group_per_row_as_the_channel_strategy():
    x = torch.randn(8, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    gm = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=4, group_size=16, select="0"),
                                    InsertFakeQuant(method="linear", bits=4, group_size=2, select="2")],
                            example_inputs=(x,))
    packed = {p.layer.name: p for p in packed_layers(gm)}
    assert packed["0"].group_size is None and packed["0"].codes.scale.shape == (4, 1)
    assert packed["2"].group_size == 2 and packed["2"].codes.scale.shape == (3, 2)
    for name, p in packed.items():  # the codes still dequantize to the fake-quant weight, bit for bit
        assert torch.equal(p.codes.dequantize(), gm.get_submodule(f"{name}.weight_quant")(
            gm.get_parameter(f"{name}.weight")).detach())


@pytest.mark.parametrize("group_size, refused", [(16, False), (4, True)])
def test_qdq_export_takes_one_group_per_row_and_refuses_groups_by_layer(tmp_path, group_size, refused):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from fxcompress import export
    from fxcompress.errors import PreconditionError
    from fxcompress.passes import ActivationConfig
    x = torch.randn(64, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                    group_size=group_size, select="0",
                                                    activations=ActivationConfig())],
                            example_inputs=(x[:2],), calibration_data=[x])
    if refused:
        with pytest.raises(PreconditionError, match=r"layer '0' \(0.weight_quant\): its group-wise weight grid"):
            export.to_onnx_int8(fq, tmp_path / "m.onnx", (x[:2],))
    else:
        export.to_onnx_int8(fq, tmp_path / "m.onnx", (x[:2],))
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is not installed")
        session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            expected = fq(x)
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item() + 1e-5
