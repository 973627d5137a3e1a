"""Least-squares reconstruction of the layers whose input channels were removed."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.batches import PaddingIncludedWarning
from fxcompress.channels.capture import _outputs, _windows
from fxcompress.channels.refit import _solve_into
from fxcompress.passes import PruneChannels
from fxcompress.zoo import ZOO


def test_least_squares_recovers_a_linear_layer_and_its_bias():
    true = nn.Linear(6, 3)
    x = torch.randn(200, 6, dtype=torch.float64)
    y = true(x.float()).double().detach()
    fitted = nn.Linear(6, 3)
    _solve_into(fitted, x, y)
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vgg_bn", "resnet", "densenet"])
def test_reconstruction_brings_outputs_back_toward_the_unpruned_model(name):
    ctor, make = ZOO[name]
    model, x = ctor().eval(), torch.cat([make() for _ in range(4)])
    calibration = [make() for _ in range(16)]
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, max_samples=1024)],
                                example_inputs=(make(),), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert rebuilt < 0.5 * plain
    assert fxcompress.history(gm)[-1].stats["reconstructed"]


def _every_position(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input rows, outputs) of a layer at every output position, as the capture lays them out."""
    windows = _windows(m, x)
    return windows.flatten(windows.dim() + 1 - m.weight.dim()).flatten(0, -2), _outputs(m, m(x)).flatten(0, -2)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
                                  lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                  lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
                                  lambda: nn.Conv3d(4, 6, 3, padding="same", padding_mode="circular", groups=2)])
def test_least_squares_recovers_grouped_and_nd_convs(make):
    true, fitted = make().double(), make().double()
    size = 6 if isinstance(true, nn.Conv3d) else 10
    x = torch.randn(8, true.in_channels, *[size] * len(true.kernel_size), dtype=torch.float64)
    rows, outputs = _every_position(true, x)
    _solve_into(fitted, rows, outputs.detach())
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-6, rtol=1e-6)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 4, 3, padding="same", padding_mode="replicate")

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class ReflectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, (3, 2), padding="same", padding_mode="reflect")

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("model, shape", [(Conv3dNet, (4, 2, 6, 6, 6)), (ReflectNet, (4, 3, 10, 10))])
def test_conv3d_and_padded_consumers_are_reconstructed(model, shape):
    model = model().eval()
    calibration = [torch.randn(shape) for _ in range(4)]
    x = torch.cat(calibration)
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("conv1",))],
                                example_inputs=(calibration[0],), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert fxcompress.history(gm)[-1].stats["reconstructed"] == ["conv2"]
    assert rebuilt < 0.95 * plain


class GroupedConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # its inputs shrink in every group
        self.head = nn.Conv1d(16, 8, 3)

    def forward(self, x):
        x = self.conv2(F.relu(self.conv1(x)))
        return self.head(x.mean(dim=2))


def test_grouped_and_1d_consumers_are_reconstructed():
    model, x = GroupedConsumers().eval(), torch.randn(8, 3, 12, 12)
    calibration = [torch.randn(8, 3, 12, 12) for _ in range(8)]
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("conv1",))],
                                example_inputs=(x[:2],), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert "conv2" in fxcompress.history(gm)[-1].stats["reconstructed"]
    assert rebuilt < 0.7 * plain


def test_a_masked_output_keeps_its_zeros_and_the_rest_is_fitted_exactly():
    torch.manual_seed(0)
    true = torch.randn(6, 12, dtype=torch.float64)
    allowed = torch.rand(6, 12) > 0.5
    allowed[0] = allowed[1]  # two outputs share a pattern: one solve for both
    true[~allowed] = 0.0
    x = torch.randn(400, 12, dtype=torch.float64)
    fitted = nn.Linear(12, 6, bias=False).double()
    _solve_into(fitted, x, x @ true.T, support=allowed)
    assert torch.equal(fitted.weight[~allowed], torch.zeros(int((~allowed).sum()), dtype=torch.float64))
    torch.testing.assert_close(fitted.weight, true, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_masked_consumers_are_reconstructed_within_their_masks(granularity):
    from fxcompress.layers import effective_weight, find_layers
    from fxcompress.passes import InsertMasks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    x = torch.cat(calibration)
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5, granularity=granularity)],
                                example_inputs=(calibration[0],))
    expected = masked(x)

    def prune(reconstruct):
        gm = fxcompress.compile(masked, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("0",))],
                                example_inputs=(calibration[0],), calibration_data=calibration)
        return gm, ((gm(x) - expected).norm() / expected.norm()).item()

    plain, plain_error = prune(False)
    rebuilt, error = prune(True)
    assert fxcompress.history(rebuilt)[-1].stats["reconstructed"] == ["2"]
    assert error < 0.9 * plain_error
    layers = {l.name: l for l in find_layers(rebuilt)}
    mask = rebuilt.get_buffer("2.weight_mask")
    assert mask.shape == (8, 8, 3, 3) and bool((mask == 0).any())
    assert torch.equal(effective_weight(rebuilt, layers["2"])[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert not torch.equal(rebuilt.get_parameter("2.weight"), plain.get_parameter("2.weight"))  # really refitted


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding="valid"),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        features = self.body(x)
        return self.head(features) + features @ self.head.weight  # the head's weight read twice: tied


@pytest.mark.parametrize("method", ["greedy", "lasso"])
def test_functional_layers_of_the_export_front_end_are_measured_and_refitted_as_modules_are(method):
    """The export front end writes layers as F.linear / F.conv2d over stored parameters that no nn.Linear owns;
    channel selection and reconstruction read them through module views of those parameters (they fell back to
    l1 and refitted nothing there), and give what they give on the fx trace's module calls."""
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(64, 3, 8, 8)
    results = {}
    for frontend in ("fx", "export"):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, method=method, reconstruct=True)],
                                example_inputs=(x,), calibration_data=[x], frontend=frontend)
        stats = fxcompress.history(gm)[-1].stats
        assert not stats.get("scored_by_l1")
        results[frontend] = (sorted(stats["reconstructed"]), gm(x))
    assert results["export"][0] == results["fx"][0] == ["body.2", "body.5", "body.7"]  # not the tied head
    torch.testing.assert_close(results["export"][1], results["fx"][1], rtol=1e-5, atol=1e-6)


# ---- the refit is the ridge least-squares solution, checked against torch.linalg.lstsq -----------------------
def _tap_features(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per group, the refit's features at every output position, computed without the capture's windows: a
    linear layer's are its inputs; a conv's column j is the conv itself run with a one-hot weight at tap j
    (its padding mode and all), so what the layer reads is what its own forward reads."""
    if isinstance(layer, nn.Linear):
        return [x.reshape(-1, x.shape[-1]).double()]
    groups, per_group = layer.groups, layer.out_channels // layer.groups
    probe = copy.deepcopy(layer).double()
    probe.bias = None
    taps = probe.weight[0].numel()
    columns = [[] for _ in range(groups)]
    for j in range(taps):
        onehot = torch.zeros(layer.out_channels, taps, dtype=torch.float64)
        onehot[:, j] = 1.0
        probe.weight = nn.Parameter(onehot.reshape(probe.weight.shape))
        y = probe(x.double()).detach().movedim(1, -1).reshape(-1, layer.out_channels)
        for g in range(groups):
            columns[g].append(y[:, g * per_group])
    return [torch.stack(c, 1) for c in columns]


def _ridge_lstsq(features: list[torch.Tensor], y: torch.Tensor, bias: bool,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in-per-group [+ bias]) by lstsq on [X; sqrt(lam) I] with the refit's ridge term, output by output
    over its allowed inputs when a mask is given."""
    from fxcompress.channels.refit import RIDGE
    per_group, rows = y.shape[1] // len(features), []
    for g, x in enumerate(features):
        yg = y[:, g * per_group:(g + 1) * per_group]
        if bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        lam = RIDGE * max(float((x * x).sum(0).mean()), 1e-12)
        block = torch.zeros(per_group, x.shape[1], dtype=x.dtype)
        for o in range(per_group):
            cols = torch.arange(x.shape[1]) if allowed is None else \
                torch.cat([allowed[g * per_group + o].flatten(), torch.ones(int(bias), dtype=torch.bool)]).nonzero()[:, 0]
            a = torch.cat([x[:, cols], lam ** 0.5 * torch.eye(len(cols), dtype=x.dtype)])
            b = torch.cat([yg[:, o:o + 1], torch.zeros(len(cols), 1, dtype=x.dtype)])
            block[o, cols] = torch.linalg.lstsq(a, b).solution[:, 0]
        rows.append(block)
    return torch.cat(rows)


class _Pair(nn.Module):
    def __init__(self, producer: nn.Module, consumer: nn.Module) -> None:
        super().__init__()
        self.p, self.c = producer, consumer

    def forward(self, x):
        return self.c(torch.relu(self.p(x)))


def _layer_io(gm: torch.fx.GraphModule, path: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of the layer computing with `{path}.weight` (a module call or a masked F.conv)."""
    from fxcompress.channels.capture import owner_path
    node = next(n for n in gm.graph.nodes if n.op in ("call_module", "call_function") and owner_path(n) == path)
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(x)
    source = node.args[0]
    if source.op == "call_function" and source.target is F.pad:  # a masked conv's padding mode: the module pads
        source = source.args[0]
    return interpreter.env[source].double(), interpreter.env[node].double()


def _flat(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1]) if isinstance(layer, nn.Linear) else y.movedim(1, -1).reshape(-1, y.shape[1])


def _check_against_lstsq(model, shape, sizes=(4, 4), dtype=torch.float32, masks=None, method="l1"):
    from fxcompress.passes import InsertMasks
    torch.manual_seed(0)
    for layer in model.modules():  # the parameters drawn here, not in whatever order the cases were collected
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    model = model.to(dtype).eval()
    calibration = [torch.randn(n, *shape, dtype=dtype) for n in sizes]
    x = torch.cat(calibration)
    if masks is not None:
        model = fxcompress.compile(model, [InsertMasks(sparsity=0.5, granularity=masks)], example_inputs=(x[:1],))
    expected = model(x)
    pruned = {}
    for reconstruct in (False, True):  # max_samples covers every position: the fit uses them all
        pruned[reconstruct] = fxcompress.compile(
            model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("p",), max_samples=10 ** 6,
                                  method=method)], example_inputs=(x[:1],), calibration_data=calibration)
    gm = pruned[True]
    assert fxcompress.history(gm)[-1].stats["reconstructed"] == ["c"]
    layer = gm.get_submodule("c")
    inputs, _ = _layer_io(gm, "c", x)
    _, target = _layer_io(model, "c", x) if masks is not None else (None, model.c(torch.relu(model.p(x))).double())
    allowed = gm.get_buffer("c.weight_mask") != 0 if masks is not None else None
    want = _ridge_lstsq(_tap_features(layer, inputs), _flat(layer, target).detach(), layer.bias is not None, allowed)
    got = layer.weight.detach().double().reshape(len(want), -1)
    if layer.bias is not None:
        got = torch.cat([got, layer.bias.detach().double()[:, None]], 1)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    if allowed is not None:
        assert torch.equal(layer.weight[~allowed], torch.zeros(int((~allowed).sum()), dtype=layer.weight.dtype))
    errors = {r: ((g(x) - expected).norm() / expected.norm()).item() for r, g in pruned.items()}
    assert errors[True] <= errors[False] + 1e-6  # the ridge term costs ~1e-7 where pruning alone lost nothing


@pytest.mark.parametrize("producer, consumer, shape, sizes, dtype", [
    (nn.Linear(6, 8), nn.Linear(8, 5), (7, 6), (1, 3, 5), torch.float32),  # 3-D input, batches of three sizes
    (nn.Linear(6, 8), nn.Linear(8, 5, bias=False), (9, 6), (1,), torch.float64),  # a single sample, float64
    (nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 3, stride=2, dilation=2, padding=3), (3, 12), (4, 4), torch.float32),
    (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, (3, 2), padding="same", padding_mode="reflect", groups=2),
     (3, 9, 9), (4, 4), torch.float32),
    (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding="valid", bias=False), (3, 9, 9), (1,), torch.float64),
    (nn.Conv3d(2, 8, 3, padding=1), nn.Conv3d(8, 4, 3, padding=1, padding_mode="circular"), (2, 5, 5, 5), (2, 2),
     torch.float32),
    (nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 4, 4, padding="same", padding_mode="replicate"), (3, 12), (4, 4),
     torch.float32),
])
def test_the_refitted_weights_are_the_ridge_least_squares_solution(producer, consumer, shape, sizes, dtype):
    _check_against_lstsq(_Pair(producer, consumer), shape, sizes, dtype)


@pytest.mark.parametrize("consumer", [nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),
                                      nn.Conv2d(8, 4, 3, padding=2, padding_mode="circular", groups=2, bias=False),
                                      nn.Conv2d(8, 4, 3, padding=1)])
@pytest.mark.parametrize("method", ["l1", "greedy"])
def test_a_masked_conv_with_a_padding_mode_is_refitted_on_its_own_windows(consumer, method):
    """A masked conv whose padding mode is not zeros is F.pad then a conv that pads nothing; its windows were
    gathered with the owner module's padding, so padded twice: positions past the output were drawn (an
    IndexError) or, when the draw missed them, every sampled row came from the wrong place."""
    _check_against_lstsq(_Pair(nn.Conv2d(3, 8, 3, padding=1), consumer), (3, 8, 8), masks="element", method=method)


class _CalledTwice(nn.Module):
    def __init__(self, conv: bool) -> None:
        super().__init__()
        make = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        self.p, self.q, self.c = make(3, 8), make(3, 8), make(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.p(x))) + self.c(torch.relu(self.q(x)))


# ---- the consumers left out of the refit, each with its reason ---------------------------------------------------
class _ReadElsewhere(nn.Module):
    """`c`'s weight (or bias) is read by something besides `c`: a reweighting of `d`'s inputs by the weight's
    column magnitudes, through the module (`c.weight` a get_attr of its own) or through one get_attr node that
    feeds an F.linear and the reweighting alike; or the bias scaling the output."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.p, self.d = how, nn.Linear(6, 8), nn.Linear(8, 4)
        self.c = nn.Linear(8, 4)
        if how == "functional":  # parameters no layer module owns, as the export front end leaves them
            self.c = nn.Module()
            self.c.weight, self.c.bias = nn.Parameter(torch.randn(4, 8) / 3), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.relu(self.p(x))
        if self.how == "bias":
            return self.c(h) * self.c.bias
        y = F.linear(h, self.c.weight, self.c.bias) if self.how == "functional" else self.c(h)
        return y + self.d(h * self.c.weight.abs().mean(0))


@pytest.mark.parametrize("how, tensor, reader", [("module", "weight", "abs_1"), ("functional", "weight", "abs_1"),
                                                 ("bias", "bias", "mul")])
def test_a_weight_another_node_reads_is_not_refitted(how, tensor, reader):
    """Only layer calls counted as other readers: a weight (or bias) that a non-layer node also computes with was
    refitted, silently changing that node's result. ParamOwnership names every reader; such a layer keeps its
    parameters and is reported with them."""
    torch.manual_seed(0)
    model, x = _ReadElsewhere(how).eval(), torch.randn(64, 6)
    results = {}
    for reconstruct in (False, True):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("p",))],
                                example_inputs=(x,), calibration_data=[x])
        results[reconstruct] = (gm, fxcompress.history(gm)[-1].stats)
    (plain, _), (gm, stats) = results[False], results[True]
    assert "c" not in stats["reconstructed"]
    assert stats["not_reconstructed"] == {"c": f"its {tensor} is also read by {reader!r}, not as this layer's "
                                               "parameter: a refit would change what they compute"}
    for name in ("c.weight", "c.bias"):
        assert torch.equal(gm.get_parameter(name), plain.get_parameter(name))
    if how != "bias":  # d, which reads the reweighted inputs, is still refitted
        assert stats["reconstructed"] == ["d"]
        assert not torch.equal(gm.get_parameter("d.weight"), plain.get_parameter("d.weight"))


@pytest.mark.parametrize("conv", [False, True])
def test_a_module_called_twice_is_not_refitted(conv):
    """One weight, two calls: each call's refit overwrote the last, fitted to the second call's inputs alone (and
    `reconstructed` named the module twice). It is left as it is, as a tied head is, and reported once."""
    torch.manual_seed(0)
    model, x = _CalledTwice(conv).eval(), torch.randn(16, 3, 6, 6) if conv else torch.randn(16, 3)
    results = []
    for reconstruct in (False, True):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("p", "q"))],
                                example_inputs=(x,), calibration_data=[x])
        results.append((gm.get_parameter("c.weight").detach(), fxcompress.history(gm)[-1].stats))
    assert results[1][1]["reconstructed"] == []
    assert results[1][1]["not_reconstructed"] == {
        "c": "called at 2 places: one weight for several calls, each call's fit would overwrite the others'"}
    assert torch.equal(results[0][0], results[1][0])


class _Tied(nn.Module):
    """`c`'s weight computed with twice: by `c` and by a matmul of its transpose (an F.linear once traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.c = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.p(x))
        return self.c(h) + h @ self.c.weight.T


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_tied_weight_is_reported_with_the_layer_calls_sharing_it(frontend):
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    gm = fxcompress.compile(_Tied().eval(), [PruneChannels(amount=0.5, reconstruct=True)], example_inputs=(x,),
                            calibration_data=[x], frontend=frontend)
    stats = fxcompress.history(gm)[-1].stats
    assert stats["channels_removed"] == 4 and stats["reconstructed"] == []
    assert list(stats["not_reconstructed"]) == ["c"]  # both calls are the one weight of `c`
    reasons = stats["not_reconstructed"]["c"].split("; ")
    assert len(reasons) == 2 and all(r.startswith("its weight is shared with '") for r in reasons)
    assert all(r.endswith("a fit for one call would change the others") for r in reasons)


class _Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        return self.c(torch.relu(self.p(x)))


def test_a_transposed_conv_is_reported_not_refitted():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    gm = fxcompress.compile(_Upsample().eval(), [PruneChannels(amount=0.5, reconstruct=True)], example_inputs=(x,),
                            calibration_data=[x])
    stats = fxcompress.history(gm)[-1].stats
    assert stats["channels_removed"] == 4 and stats["reconstructed"] == []
    assert stats["not_reconstructed"] == {"c": "a transposed conv: each output sums several input positions' "
                                               "contributions, no one input window, which is what the refit's rows "
                                               "gather"}


def test_routed_experts_are_reported_not_refitted():
    """An expert's rows are the tokens its router sends it, other tokens once pruning changes the router's inputs:
    each expert whose inputs shrank is named with that reason (it showed only by its absence)."""
    pytest.importorskip("transformers")
    from hfmodels import build

    from fxcompress.channels.refit import ROUTED
    model, x, other = build("mixtral")
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=True)], example_inputs=(x,),
                            calibration_data=[x, other])
    stats = fxcompress.history(gm)[-1].stats
    assert stats["reconstructed"] and not [path for path in stats["reconstructed"] if ".experts." in path]
    experts = [path for path in stats["not_reconstructed"] if ".experts." in path]
    assert experts and all(stats["not_reconstructed"][path] == ROUTED for path in experts)


class _FakeQuantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p, self.c = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        w = torch.fake_quantize_per_tensor_affine(self.c.weight, 0.05, 0, -128, 127)
        return F.linear(torch.relu(self.p(x)), w, self.c.bias)


def test_a_fake_quantized_weight_is_no_consumer_and_says_why():
    """The layer computes with a function of its stored weight: a fit of the stored tensor is not the weight it
    computes with (fake-quantized layers freeze their channels in the pass, so the reason is checked here)."""
    from fxcompress.channels.capture import consumer_module, why_not_consumer
    gm = torch.fx.symbolic_trace(_FakeQuantized())
    node = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert consumer_module(gm, node) is None
    assert why_not_consumer(gm, node).startswith("its weight is transformed in the graph (fake-quantized")
    plain = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert consumer_module(gm, plain) is gm.p and why_not_consumer(gm, plain) is None


def test_every_consumer_refitted_leaves_nothing_to_report():
    torch.manual_seed(0)
    model, x = _Pair(nn.Linear(6, 8), nn.Linear(8, 5)).eval(), torch.randn(32, 6)
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=True)], example_inputs=(x,),
                            calibration_data=[x])
    stats = fxcompress.history(gm)[-1].stats
    assert stats["reconstructed"] == ["c"] and stats["not_reconstructed"] == {}
    plain = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(x,))
    assert "not_reconstructed" not in fxcompress.history(plain)[-1].stats  # no refit asked, none reported


# ---- calibration batches of different lengths, and dicts -------------------------------------------------------
class _Tokens(nn.Module):
    """(batch, sequence, features) through two linear layers, gated by a second input."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.c = nn.Linear(6, 8), nn.Linear(8, 5)

    def forward(self, x, gate):
        return self.c(torch.relu(self.p(x)) * gate)


def test_sequences_of_different_lengths_are_refitted_on_every_position():
    """Batches of 3, 9 and 5 positions failed in torch.cat before any refit; each is now run as it is and the
    refit is the ridge least-squares solution over all their positions."""
    torch.manual_seed(0)
    model = _Tokens().eval()
    batches = [(torch.randn(2, n, 6), torch.rand(2, n, 1)) for n in (3, 9, 5)]
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=True, select=("p",), max_samples=10 ** 6)],
                            example_inputs=batches[0], calibration_data=batches)
    assert fxcompress.history(gm)[-1].stats["reconstructed"] == ["c"]
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    inputs, targets = [], []
    for x, gate in batches:
        with torch.no_grad():
            interpreter.run(x, gate)
            node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "c")
            inputs.append(interpreter.env[node.args[0]].double().reshape(-1, 4))
            targets.append(model(x, gate).double().reshape(-1, 5))
    want = _ridge_lstsq([torch.cat(inputs)], torch.cat(targets), bias=True)
    got = torch.cat([gm.c.weight.detach().double(), gm.c.bias.detach().double()[:, None]], 1)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("method", ["l1", "greedy"])
def test_dict_batches_are_bound_by_name_as_the_calibration_walk_binds_them(method):
    """A tokenizer-style dict batch (any key order) refits as the same batch given positionally, in selection
    (greedy reads the features too) and reconstruction; a key the graph has no input for is refused by name."""
    from fxcompress.errors import PreconditionError
    torch.manual_seed(0)
    model = _Tokens().eval()
    batches = [(torch.randn(2, n, 6), torch.rand(2, n, 1)) for n in (4, 7)]
    prune = PruneChannels(amount=0.5, reconstruct=True, select=("p",), method=method)
    positional = fxcompress.compile(model, [prune], example_inputs=batches[0], calibration_data=batches)
    named = fxcompress.compile(model, [prune], example_inputs=batches[0],
                               calibration_data=[{"gate": g, "x": x} for x, g in batches])
    assert fxcompress.history(named)[-1].stats["reconstructed"] == ["c"]
    for name, value in positional.state_dict().items():
        assert torch.equal(named.state_dict()[name], value), name
    with pytest.raises(PreconditionError, match=r"calibration batch 1: the graph has no input named 'gates'"):
        fxcompress.compile(model, [prune], example_inputs=batches[0],
                           calibration_data=[{"x": batches[0][0], "gate": batches[0][1]}, {"x": batches[1][0],
                                                                                           "gates": batches[1][1]}])


# ---- padded positions (zeros of an attention_mask input) ----------------------------------------------------------
VOCAB, LENGTH = 64, 12


class _TinyLM(nn.Module):
    """Embedding, one self-attention that reads the unpadded keys only (the mask applied as transformers applies
    it), an MLP and a head: the real tokens' values do not depend on what the padded positions hold."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        scores = (self.q(h) @ self.k(h).transpose(1, 2)) / 4
        # a padded key weighs exactly zero after the softmax (exp underflows), as in transformers' masks
        scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        h = h + self.o(scores.softmax(-1) @ self.v(h))
        return self.head(h + self.down(torch.relu(self.up(h))))


def _padded_tokens(pad_token: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches; the first right-padded (row 0 holds 7 real tokens, row 1 holds 10, the rest `pad_token`)."""
    gen = torch.Generator().manual_seed(5)
    first, second = (torch.randint(0, VOCAB, (2, LENGTH), generator=gen) for _ in range(2))
    mask = torch.ones_like(first)
    mask[0, 7:], mask[1, 10:] = 0, 0
    return [(first.masked_fill(mask == 0, pad_token), mask), (second, torch.ones_like(second))]


def _prune_tiny_lm(pad_token: int, **options) -> tuple[torch.fx.GraphModule, dict]:
    torch.manual_seed(0)
    model = _TinyLM().eval()
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():  # every consumer here reads (batch, sequence, features) rows: nothing to warn
        warnings.simplefilter("error", PaddingIncludedWarning)
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, **options)],
                                example_inputs=(ids, torch.ones_like(ids)), calibration_data=_padded_tokens(pad_token))
    return gm, fxcompress.history(gm)[-1].stats


def _float_state(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if v.is_floating_point()}


def test_padded_positions_do_not_change_the_refitted_weights():
    """The padded positions hold other token ids in the two runs, nothing else differs: the refit reads the
    unpadded positions only, so the weights are bit-identical (its rows held the padded positions, and they
    differed)."""
    one, stats = _prune_tiny_lm(0, reconstruct=True)
    other, _ = _prune_tiny_lm(VOCAB - 1, reconstruct=True)
    assert stats["reconstructed"] and stats["channels_removed"] > 0
    a, b = _float_state(one), _float_state(other)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_padded_positions_do_not_change_the_greedy_selection(monkeypatch):
    """ThiNet's contributions are measured at unpadded positions only: bit-identical in the two runs, and so are
    the channels chosen and the refitted weights."""
    from fxcompress.channels import select
    seen = []

    def greedy(z, *args):
        seen.append(z.copy())
        return select._greedy_order(z, *args)

    monkeypatch.setitem(select._DATA_SCORES, "greedy", greedy)
    one, stats = _prune_tiny_lm(0, method="greedy", reconstruct=True)
    runs = len(seen)
    other, _ = _prune_tiny_lm(VOCAB - 1, method="greedy", reconstruct=True)
    assert runs > 0 and len(seen) == 2 * runs and stats["channels_removed"] > 0
    assert all(np.array_equal(z, w) for z, w in zip(seen[:runs], seen[runs:]))
    a, b = _float_state(one), _float_state(other)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


class _ConvOverTokens(nn.Module):
    """A conv1d over the sequence reading a pruned linear layer's outputs: its windows span several positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.conv = nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.fc(self.embed(input_ids))) * attention_mask[..., None]
        return self.conv(h.transpose(1, 2))


def test_a_conv_whose_windows_span_padded_positions_is_refitted_on_them_and_named():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(6))
    prune = PruneChannels(amount=0.5, reconstruct=True, select=("fc",))
    with pytest.warns(PaddingIncludedWarning, match=r"PruneChannels \(reconstruction\).*'conv'") as caught:
        gm = fxcompress.compile(_ConvOverTokens().eval(), [prune], example_inputs=(ids, torch.ones_like(ids)),
                                calibration_data=_padded_tokens(0))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["reconstructed"] == ["conv"] and stats["calibration_padding_included"] == ["conv"]
    # told once: the refit re-reads the layers the targets' capture read and warned of
    assert len([w for w in caught if issubclass(w.category, PaddingIncludedWarning)]) == 1
