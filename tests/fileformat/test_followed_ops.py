"""The ops models came to hold: the dropout variants and BatchNorm3d (which the export front end makes modules of),
the torch-level spellings of aten ops it writes, and the shape, scan and reduction ops the channel tables follow.
Each form (function, method, module) saves, loads and computes as before, fx traced and exported, pruned or not."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.encoded.module import EncodedWeight
from fxcompress.fileformat.allowlist import FUNCTION_NAMES, METHODS, MODULE_NAMES
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.fileformat.dryrun import dry_run
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded, PruneChannels


def _round_trip(gm, x):
    """The model loaded from its file (which records x's shape: load runs its dry run on it)."""
    return from_bytes(to_bytes(gm, example_inputs=(x,)))


# ---- dropout variants and BatchNorm3d -------------------------------------------------------------

class Dropouts(nn.Module):
    """Each dropout module and function, on inputs of the dims each takes, between two convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, 1)
        self.bn = nn.BatchNorm3d(6)
        self.drop1, self.drop2, self.drop3 = nn.Dropout1d(0.3), nn.Dropout2d(0.4), nn.Dropout3d(0.2)
        self.alpha, self.feature_alpha = nn.AlphaDropout(0.1), nn.FeatureAlphaDropout(0.25)
        self.head = nn.Conv3d(6, 4, 1)

    def forward(self, x):  # x: [2, 3, 4, 4, 4]
        h = self.drop3(self.bn(self.conv(x)))
        h = self.drop2(h.flatten(3)).unflatten(3, (4, 4))  # [2, 6, 4, 16]
        h = self.drop1(h.flatten(2)).unflatten(2, (4, 4, 4))  # [2, 6, 64]
        h = self.feature_alpha(self.alpha(h))
        h = F.dropout3d(h, 0.3, self.training) + F.dropout1d(h.flatten(2), 0.2, self.training).view_as(h)
        h = F.dropout2d(h.flatten(3), 0.5, self.training).view_as(h)
        h = F.alpha_dropout(h, 0.1, self.training) + F.feature_alpha_dropout(h, 0.2, self.training)
        return self.head(h)


def _dropouts():
    torch.manual_seed(0)
    model = Dropouts().eval()
    with torch.no_grad():  # statistics that are not the identity, so loading them is checked
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 4, 4, 4)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dropout_variants_and_batchnorm3d_save_load_and_compute_alike(frontend):
    model, x = _dropouts()
    gm = fxcompress.compile(model, [], (x,), frontend=frontend)
    kinds = {type(m) for m in gm.modules()}
    assert {nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.BatchNorm3d} <= kinds
    if frontend == "fx":  # the functions stay calls under fx (the export front end makes modules of them)
        called = {n.target for n in gm.graph.nodes if n.op == "call_function"}
        assert {F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout} <= called
    loaded = _round_trip(gm, x)
    assert {type(m) for m in loaded.modules()} >= kinds - {type(gm)}
    assert torch.equal(loaded(x), model(x)) and torch.equal(loaded(x), gm(x))
    # the modules keep their rates, and train() drops as the model does (the same channels, from the same seed)
    assert [m.p for m in loaded.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] == \
        [m.p for m in gm.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    loaded.train(), gm.train()
    torch.manual_seed(1)
    dropped = gm(x)
    torch.manual_seed(1)
    assert torch.equal(loaded(x), dropped)


def test_a_dropout_rate_outside_0_1_is_refused_when_the_file_is_read():
    from .hostile import read_manifest, with_manifest
    model, x = _dropouts()
    data = to_bytes(torch.fx.symbolic_trace(model), example_inputs=(x,))
    manifest = read_manifest(data)
    next(m for m in manifest["modules"] if m["type"] == "Dropout2d")["config"]["p"] = 1.5
    with pytest.raises(fxcompress.FormatError, match="module 'drop2': Dropout2d.*cannot be built.*between 0 and 1"):
        from_bytes(with_manifest(data, manifest))


# ---- the torch-level spellings of aten ops the export front end writes --------------------------------

class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):  # x: [2, 4, 6, 6]
        h = self.conv(x)
        tiled = torch.tile(h, (1, 2, 1)) + h.tile(1, 1, 2, 1)  # [2, 8, 12, 6]
        norms = torch.linalg.vector_norm(h, 2, dim=(2, 3)) + torch.logsumexp(h, dim=(2, 3)) + h.logsumexp(2).sum(-1)
        unshuffled = F.pixel_unshuffle(h, 2)  # [2, 32, 3, 3]
        first, second, third = h.tensor_split(3, dim=2)
        return tiled.sum((2, 3)) + norms + unshuffled.sum((2, 3)).view(2, 8, 4).sum(-1) + (first + second + third).mean((2, 3))


def test_the_spellings_save_load_and_compute_alike_under_both_front_ends():
    torch.manual_seed(0)
    model, x = Spellings().eval(), torch.randn(2, 4, 6, 6)
    expected = model(x)
    for frontend in ("fx", "export"):
        gm = fxcompress.compile(model, [], (x,), frontend=frontend)
        targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
        assert {torch.tile, torch.linalg.vector_norm, torch.logsumexp, F.pixel_unshuffle} <= targets, frontend
        assert all(t in FUNCTION_NAMES or t in METHODS for t in targets)
        torch.testing.assert_close(_round_trip(gm, x)(x), expected, rtol=0, atol=0)


# ---- the ops the channel tables follow, in each form ---------------------------------------------

class FunctionOps(nn.Module):
    """Each op as a torch function (or F.), between a convolution and a head whose channels are pruned."""

    def __init__(self):
        super().__init__()
        self.conv, self.mid, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):  # x: [2, 3, 8, 8]
        h = torch.relu(self.conv(x))
        h = torch.moveaxis(torch.movedim(h, 1, -1), -1, 1)
        h = torch.flip(torch.roll(torch.narrow(h, 2, 1, 6), 1, 3), (2,))  # [2, 8, 6, 8]
        h = h + 0.1 * torch.cumsum(h, 3) + torch.cumprod(torch.sigmoid(h), 2)
        h = torch.repeat_interleave(torch.tile(h, (1, 1, 2, 1)), 2, dim=3)  # [2, 8, 12, 16]
        a, b = torch.tensor_split(h, 2, dim=2)
        h = F.pixel_shuffle(F.pixel_unshuffle(a + b, 2), 2)  # [2, 8, 6, 16]
        h = self.mid(torch.unflatten(h, 3, (4, 4)).sum(-1))  # [2, 8, 6, 4]
        rows = F.normalize(h, dim=3).flatten(2)  # [2, 8, 24]
        v = torch.linalg.vector_norm(h, 2, dim=(2, 3)) + torch.norm(h, 2, (2, 3)) + torch.logsumexp(rows, 2)
        v = v + torch.var(rows, 2) + torch.std(rows, 2) + torch.topk(rows, 3, 2).values.sum(-1)
        v = v + torch.sort(rows, 2).values[..., -1] + rows.mT.sum(1) + v.T.T
        return self.head(v)


class MethodOps(nn.Module):
    """The same ops as tensor methods."""

    def __init__(self):
        super().__init__()
        self.conv, self.mid, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = h.movedim(1, -1).moveaxis(-1, 1).narrow(2, 1, 6).roll(1, 3).flip(2)
        h = h + 0.1 * h.cumsum(3) + h.sigmoid().cumprod(2)
        h = h.tile(1, 1, 2, 1).repeat(1, 1, 1, 2).repeat_interleave(1, dim=3)  # [2, 8, 12, 16]
        a, b = h.tensor_split(2, dim=2)
        h = self.mid((a + b).unflatten(3, (4, 4)).sum(-1))
        rows = h.flatten(2)
        v = h.norm(2, (2, 3)) + rows.logsumexp(2) + rows.var(2) + rows.std(2)
        v = v + rows.topk(3, 2).values.sum(-1) + rows.topk(2, 2)[0].sum(-1) + rows.sort(2).values[..., 0]
        return self.head(v + rows.sort(2).indices[..., 0].float() * 0)


class ModuleOps(nn.Module):
    """nn.Unflatten, nn.PixelShuffle and nn.PixelUnshuffle."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(2), nn.PixelShuffle(2)
        self.unflatten = nn.Unflatten(2, (4, 16))

    def forward(self, x):
        h = self.shuffle(self.unshuffle(torch.relu(self.conv(x))))  # [2, 8, 8, 8]
        return self.head(self.unflatten(h.flatten(2)).sum(2, keepdim=True))


@pytest.mark.parametrize("make", [FunctionOps, MethodOps, ModuleOps], ids=lambda m: m.__name__)
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_pruned_model_using_the_channel_tables_ops_saves_and_loads(make, frontend):
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every op reaches a torch-level spelling
        gm = fxcompress.compile(model, [], (x,), frontend=frontend)
    torch.testing.assert_close(_round_trip(gm, x)(x), model(x), rtol=0, atol=0)
    pruned = fxcompress.compile(model, [InsertMasks(sparsity=0.5), PruneChannels(amount=0.5)], (x,),
                                frontend=frontend)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    loaded = _round_trip(pruned, x)
    other = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(loaded(other), pruned(other), rtol=0, atol=0)


def test_each_followed_module_type_is_named():
    for cls in (nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout, nn.BatchNorm3d):
        assert cls in MODULE_NAMES, cls


# ---- encoded weights converted with the model ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_an_encoded_model_converted_after_lowering_saves_loads_and_its_dry_run_agrees(dtype):
    """The dry run made an encoded weight's output of its header's dtype (float32) whatever the model was
    converted to, so a .half() model's F.linear met a float16 input and bias with a float32 weight: save refused
    it. The module's own dtype is what its forward returns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    x = torch.randn(3, 16)
    passes = [InsertMasks(sparsity=0.5), InsertFakeQuant(bits=4, method="kmeans"), LowerToEncoded()]
    gm = fxcompress.compile(model, passes, example_inputs=(x,), verify=False).to(dtype)
    encoded = [m for m in gm.modules() if isinstance(m, EncodedWeight)]
    assert encoded and all(m.dtype == str(dtype).removeprefix("torch.") for m in encoded)
    x = x.to(dtype)
    loaded = from_bytes(to_bytes(gm, example_inputs=(x,)))
    assert torch.equal(loaded(x), gm(x)) and loaded(x).dtype == dtype
    values = dry_run(loaded, [{"shape": list(x.shape), "dtype": str(dtype).removeprefix("torch.")}])
    for node in loaded.graph.nodes:  # each node's meta value is what the forward computes
        if node.op == "call_module" and isinstance(loaded.get_submodule(node.target), EncodedWeight):
            real = loaded.get_submodule(node.target)()
            assert values[node.name].dtype == real.dtype == dtype and values[node.name].shape == real.shape
    output = next(n for n in loaded.graph.nodes if n.op == "output").args[0]
    assert values[output.name].dtype == dtype and values[output.name].shape == loaded(x).shape
