"""Models as people write them save and load: child names that are not identifiers, axis swaps,
and the torchvision models with stochastic depth (when the vision extra is installed)."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.fileformat.allowlist import is_safe_path_part
from fxcompress.errors import FormatError
from fxcompress.passes import InsertMasks
from .hostile import read_manifest, with_manifest
import fxcompress.fileformat.container


class HyphenatedBlocks(nn.Module):
    """RegNet-style child names (`block1-0`), an axis swap and a channel move."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential()
        for i in range(2):
            self.trunk.add_module(f"block1-{i}", nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.trunk(x)
        y = torch.swapaxes(y, 1, 3).swapaxes(1, 2)          # NCHW -> NHWC
        return self.head(torch.movedim(y, 3, 1).mean((2, 3)))


def test_hyphenated_child_names_and_axis_swaps_save_and_load(tmp_path):
    x = torch.randn(2, 4, 6, 6)
    gm = fxcompress.compile(HyphenatedBlocks().eval(), [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    fxcompress.save(gm, tmp_path / "m.fxc")
    back = fxcompress.load(tmp_path / "m.fxc")
    assert torch.equal(back(x), gm(x))
    assert hasattr(back.trunk, "block1-1")


@pytest.mark.parametrize("step", ['a"b', "a\\b", "a b", "a__b", "__x", "a)", "", "ａ"])
def test_path_steps_that_could_leave_fx_getattr_string_are_refused(step):
    # torch.fx writes a step that is not an identifier as getattr(base, "step")
    assert not is_safe_path_part(step)


@pytest.mark.parametrize("step", ["block1-0", "0", "conv1", "a-b_c", "self"])
def test_plain_child_names_are_path_steps(step):
    assert is_safe_path_part(step)


VISION = ["convnext_tiny", "efficientnet_b0", "swin_t", "regnet_x_400mf", "maxvit_t", "mobilenet_v3_small"]


@pytest.mark.parametrize("name", VISION)
def test_torchvision_models_save_and_load(name, tmp_path):
    models = pytest.importorskip("torchvision.models", reason="torchvision (the vision extra) is not installed")
    x = torch.randn(1, 3, 224, 224)
    gm = fxcompress.compile(models.get_model(name, weights=None).eval(), [InsertMasks(sparsity=0.5)],
                            example_inputs=(x,))
    fxcompress.save(gm, tmp_path / "m.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "m.fxc")(x), gm(x))


class TiedHead(nn.Module):
    """A token table and an LM head sharing one Parameter, under a BERT-style `self` path step."""

    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.attention.self.weight

    def forward(self, tokens):
        return self.head(self.attention.self(tokens))


def test_a_tied_model_saved_without_any_pass_loads_and_runs(tmp_path):
    tokens = torch.randint(0, 11, (2, 5))
    gm = fxcompress.compile(TiedHead().eval(), [], example_inputs=(tokens,))
    size = fxcompress.save(gm, tmp_path / "m.fxc")
    back = fxcompress.load(tmp_path / "m.fxc")
    assert torch.equal(back(tokens), gm(tokens))
    # the table is stored once and comes back as one Parameter under both names: still tied for training
    assert back.head.weight is back.get_submodule("attention.self").weight
    untied = TiedHead().eval()
    untied.head.weight = nn.Parameter(untied.head.weight.detach().clone())
    untied_size = fxcompress.save(fxcompress.compile(untied, [], example_inputs=(tokens,)), tmp_path / "u.fxc")
    assert untied_size - size >= 11 * 6 * 4


def _tied_file(tmp_path) -> bytes:
    tokens = torch.randint(0, 11, (2, 5))
    fxcompress.save(fxcompress.compile(TiedHead().eval(), [], example_inputs=(tokens,)), tmp_path / "m.fxc")
    return (tmp_path / "m.fxc").read_bytes()


@pytest.mark.parametrize("same_as, message", [
    ("nowhere.weight", "must name a tensor stored earlier"),
    (7, "must name a tensor stored earlier"),
])
def test_a_tie_must_name_a_tensor_stored_before_it(tmp_path, same_as, message):
    data = _tied_file(tmp_path)
    manifest = read_manifest(data)
    tie = next(entry for entry in manifest["tensors"] if "same_as" in entry)
    tie["same_as"] = same_as
    with pytest.raises(FormatError, match=message):
        fxcompress.fileformat.container.from_bytes(with_manifest(data, manifest))


def test_a_tie_into_a_slot_of_another_shape_is_refused(tmp_path):
    data = _tied_file(tmp_path)
    manifest = read_manifest(data)
    stored = next(entry for entry in manifest["tensors"] if "same_as" not in entry)
    stored["shape"], stored["length"] = [6, 11], stored["length"]  # same bytes, the slot's transpose
    with pytest.raises(FormatError, match="does not fit"):
        fxcompress.fileformat.container.from_bytes(with_manifest(data, manifest))
