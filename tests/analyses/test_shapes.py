import torch

from fxcompress.analyses import ParamOwnership, ShapeInfo
from fxcompress.pass_base import PassContext
from fxcompress.tracing import trace
from fxcompress.zoo import ResNetSmall


def test_shapes_of_every_node_without_touching_bn_statistics():
    model = ResNetSmall().train()
    gm = trace(model)
    x = torch.randn(2, 3, 32, 32)
    info = ShapeInfo.compute(gm, PassContext(example_inputs=(x,), gm=gm))
    assert info.shape("stem_0") == (2, 16, 32, 32)
    assert info.shape("fc") == (2, 10)
    assert gm.training and gm.get_submodule("stem.1").training  # modes restored
    assert int(gm.get_submodule("stem.1").num_batches_tracked) == 0  # ran in eval mode


def test_ownership_maps_parameters_to_modules_and_readers():
    gm = trace(ResNetSmall())
    own = ParamOwnership.compute(gm, PassContext(example_inputs=None, gm=gm))
    assert own.owner["layer2.0.shortcut.0.weight"] == "layer2.0.shortcut.0"
    assert own.readers["fc.weight"] == ("fc",)
    assert own.readers["stem.1.running_mean"] == ("stem_1",)
