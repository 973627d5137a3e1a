import operator
import sys
import time
import tracemalloc

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxcompress
from fxcompress.fileformat import allowlist
from fxcompress.fileformat.allowlist import fxcompress_modules
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.errors import ConfigError, FormatError
from fxcompress.quant.integer import IntegerLayer, QuantizeInput
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger
from fxcompress.quant import ActivationQuant
from fxcompress.zoo import LeNet5

from .hostile import read_manifest, with_manifest


def _activation_quantized(x):
    return fxcompress.compile(LeNet5().eval(), [InsertFakeQuant(method="linear", bits=8,
                                                                 activations=ActivationConfig(observer="percentile"))],
                              example_inputs=(x[:2],), calibration_data=[x])


def test_every_fxcompress_module_type_has_a_stable_file_name():
    table = fxcompress_modules()
    assert table["fxcompress.integer.IntegerLayer"] is IntegerLayer  # the name files of version 1 carry
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



@pytest.fixture
def clean_tables():
    """Registration changes process-wide tables; put them back after each test."""
    tables = (allowlist.FUNCTIONS, allowlist.FUNCTION_NAMES, allowlist.MODULES, allowlist.MODULE_NAMES)
    saved = [dict(t) for t in tables]
    tried = allowlist._torchvision_tried
    yield
    for table, contents in zip(tables, saved):
        table.clear()
        table.update(contents)
    allowlist._torchvision_tried = tried


def user_scale(x, factor=2.0):
    return x * factor


class UserGate(torch.nn.Module):
    def __init__(self, width: int, sharp: bool = False):
        super().__init__()
        self.width, self.sharp = width, sharp
        self.gate = torch.nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return x * (self.gate > 0.5 if self.sharp else self.gate)


class _GateLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, UserGate) or super().is_leaf_module(module, qualified_name)


def _user_graph():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), UserGate(6)).eval()
    gm = torch.fx.GraphModule(model, _GateLeafTracer().trace(model))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(user_scale, (out.args[0],), {"factor": 3.0})
    out.args = (scaled,)
    gm.recompile()
    return gm


def test_user_functions_and_modules_load_only_once_registered(clean_tables):
    gm, x = _user_graph(), torch.randn(2, 4)
    with pytest.raises(FormatError, match="register_function"):
        to_bytes(gm)
    fxcompress.register_function(user_scale)
    with pytest.raises(FormatError, match="register_module"):
        to_bytes(gm)
    assert fxcompress.register_module(UserGate, ["width", "sharp"]) == f"{__name__}.UserGate"
    data = to_bytes(gm)
    assert torch.equal(from_bytes(data)(x), gm(x))
    del allowlist.MODULES[f"{__name__}.UserGate"]  # a program that never registered the type
    with pytest.raises(FormatError, match=f"module '1'.*{__name__}.UserGate.*register_module"):
        from_bytes(data)
    fxcompress.register_module(UserGate, ["width", "sharp"])
    del allowlist.FUNCTIONS[f"{__name__}.user_scale"]  # nor the function
    with pytest.raises(FormatError, match="user_scale.*register_function"):
        from_bytes(data)


def test_registration_refuses_bad_fields_and_taken_names(clean_tables):
    with pytest.raises(ConfigError, match="field 'gate'"):
        fxcompress.register_module(UserGate, ["width", "gate"])
    with pytest.raises(ConfigError, match="already names"):
        fxcompress.register_function(user_scale, name="torch.flatten")
    with pytest.raises(ConfigError, match="not callable"):
        fxcompress.register_function(3)
    with pytest.raises(ConfigError, match="already names"):
        fxcompress.register_module(UserGate, ["width"], name="Linear")


_FAKE_TORCHVISION = {
    "torchvision/__init__.py": "",
    "torchvision/ops/__init__.py": "from .stochastic_depth import stochastic_depth\n",
    "torchvision/ops/stochastic_depth.py": "def stochastic_depth(input, p, mode, training=True):\n"
                                           "    return input if not training or p == 0 else input * (1 - p)\n",
}


@pytest.fixture
def fake_torchvision(tmp_path, monkeypatch):
    """The stand-in on sys.path for one test; afterwards its modules leave sys.modules (a package imported
    later in this process, as Lightning imports torchvision, must not find the stand-in) and monkeypatch
    puts back any real torchvision modules it hid."""
    for name, text in _FAKE_TORCHVISION.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]


def test_torchvision_functions_are_registered_lazily_when_it_imports(clean_tables, fake_torchvision):
    """A stand-in torchvision package (the real one is an optional extra): stochastic depth saves and loads."""
    # an earlier test may have registered the real torchvision's functions (clean_tables puts them back)
    for key in [k for k in allowlist.FUNCTIONS if k.startswith("torchvision.")]:
        allowlist.FUNCTION_NAMES.pop(allowlist.FUNCTIONS.pop(key), None)
    allowlist._torchvision_tried = False
    import torchvision.ops

    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    gm = torch.fx.symbolic_trace(model)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        dropped = gm.graph.call_function(torchvision.ops.stochastic_depth, (out.args[0], 0.2, "row", False))
    out.args = (dropped,)
    gm.recompile()
    assert "torchvision.ops.stochastic_depth.stochastic_depth" not in allowlist.FUNCTIONS
    data = to_bytes(gm)  # the miss imports torchvision and registers its functions
    assert allowlist.FUNCTIONS["torchvision.ops.stochastic_depth.stochastic_depth"] is torchvision.ops.stochastic_depth
    x = torch.randn(3, 4)
    allowlist.FUNCTIONS.pop("torchvision.ops.stochastic_depth.stochastic_depth")
    allowlist._torchvision_tried = False  # a fresh program: loading registers them again
    assert torch.equal(from_bytes(data)(x), gm(x))


# ---- sizes a file states ------------------------------------------------------------------------

# (function or method, args after the tensor a method is called on, kwargs): small calls of each form
_CREATIONS = [
    (torch.arange, (7,), {}), (torch.arange, (2, 9), {}), (torch.arange, (1, 10, 3), {}),
    (torch.arange, (0.0, 2.5, 0.5), {}), (torch.arange, (5, 5), {}), (torch.arange, (), {"end": 4}),
    (torch.arange, (-3.0, 3.0), {"step": 1.5, "dtype": torch.float32}),
    (torch.ones, (2, 3), {}), (torch.ones, ((4, 5),), {}), (torch.ones, (), {"size": [3]}),
    (torch.zeros, ([2, 2, 3],), {"dtype": torch.long}), (torch.zeros, (), {"size": (2, 0)}),
    (torch.full, ((3, 4), 0.5), {}), (torch.full, (), {"size": [2], "fill_value": 1.0}),
    ("new_ones", (2, 5), {}), ("new_ones", ((3, 3),), {"dtype": torch.bool}), ("new_zeros", ([4],), {}),
    ("new_full", ((2, 3), 7.0), {}), ("expand", (4, 6), {}), ("expand", ((2, 3, 6),), {}),
    ("expand", (5, -1), {}), ("repeat", (2, 3), {}), ("repeat", ((1, 4, 2),), {}),
]


@pytest.mark.parametrize("target, args, kwargs", _CREATIONS, ids=lambda v: getattr(v, "__name__", None))
def test_created_elements_are_what_torch_creates(target, args, kwargs):
    """Each count agrees with the tensor torch builds (methods on a 1 x 1 tensor: what expand keeps with
    -1 and what repeat repeats is the input's size, not the file's)."""
    x = torch.randn(1, 1)
    count = allowlist.CREATED_ELEMENTS[target]
    if isinstance(target, str):
        assert target in allowlist.METHODS
        made = getattr(x, target)(*args, **kwargs)
        assert count((x, *args), kwargs) == made.numel()
    else:
        assert target in allowlist.FUNCTION_NAMES
        assert count(args, kwargs) == target(*args, **kwargs).numel()


def test_a_size_computed_in_the_forward_counts_one_element():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    length = graph.call_method("size", (x, 1))
    assert allowlist.CREATED_ELEMENTS[torch.arange]((length,), {}) == 1  # the inputs' size, not the file's
    assert allowlist.CREATED_ELEMENTS[torch.arange]((0, length, 2), {}) == 1
    assert allowlist.CREATED_ELEMENTS[torch.ones]((length, 1000), {}) == 1000  # the written factor still counts
    assert allowlist.CREATED_ELEMENTS["expand"]((x, length, 1000), {}) == 1000
    assert allowlist.CREATED_ELEMENTS[torch.arange]((0, float("inf")), {}) > 1 << 60
    assert allowlist.CREATED_ELEMENTS[torch.arange]((0, 10 ** 400), {}) == 10 ** 400  # exact, no float overflow


# ---- sizes a file states that multiply the input's --------------------------------------------------

# (function or method, the input, args after it, kwargs): calls whose output grows with a size the file writes
_GROWTHS = [
    (F.pad, torch.randn(2, 3, 4), ((1, 2, 0, 3),), {}),
    (F.pad, torch.randn(1, 5), (), {"pad": [4, 4]}),
    (torch.repeat_interleave, torch.randn(3, 2), (4,), {}),
    (torch.repeat_interleave, torch.randn(3, 2), (2,), {"dim": 0, "output_size": 6}),
    ("repeat_interleave", torch.randn(3, 2), (5,), {}),
    (torch.tile, torch.randn(3, 2), ((2, 3),), {}), (torch.tile, torch.randn(3, 2), ((4, 1, 2),), {}),
    (torch.tile, torch.randn(3, 2), (), {"dims": (5,)}), ("tile", torch.randn(3, 2), (2, 3), {}),
    ("tile", torch.randn(3, 2), ((3, 1, 1),), {}), ("repeat", torch.randn(3, 2), (2, 1, 4), {}),
    (F.one_hot, torch.tensor([0, 2, 1]), (7,), {}),
    (torch.histc, torch.randn(10), (), {"bins": 33}),
    (F.interpolate, torch.randn(1, 2, 3, 3), (None, 4.0), {}),
    (F.interpolate, torch.randn(1, 2, 3, 3), (), {"scale_factor": (2.0, 3.5)}),
    (F.interpolate, torch.randn(1, 2, 3, 3), ((9, 12),), {}),
    (F.interpolate, torch.randn(1, 2, 4), (), {"size": 11}),
    (F.adaptive_avg_pool2d, torch.randn(1, 2, 3, 3), ((8, 5),), {}),
    (F.adaptive_avg_pool1d, torch.randn(1, 2, 3), (13,), {}),
    (F.adaptive_max_pool2d, torch.randn(1, 2, 2, 2), (6,), {}),
    (F.conv2d, torch.randn(1, 2, 3, 3), (torch.randn(2, 2, 1, 1), None, 1, 5), {}),  # channels kept: the
    # weight's own growth is the file's tensors
    (F.conv1d, torch.randn(1, 2, 3), (torch.randn(2, 2, 3),), {"padding": "same"}),
    (F.conv_transpose2d, torch.randn(1, 2, 3, 3), (torch.randn(2, 2, 2, 2), None, 4), {"output_padding": 1}),
    (F.conv_transpose1d, torch.randn(1, 2, 3), (torch.randn(2, 2, 3), None, 2, 1, 1, 1, 3), {}),
]


@pytest.mark.parametrize("target, x, args, kwargs", _GROWTHS, ids=lambda v: getattr(v, "__name__", None))
def test_a_growth_count_bounds_what_torch_creates_per_input_element(target, x, args, kwargs):
    """The count is a factor on the input's size: at least what torch's output holds per input element
    (of the input, and of a weight, the file's own tensors)."""
    count = allowlist.CREATED_ELEMENTS[target]
    node_args = (x, *args)
    made = getattr(x, target)(*args, **kwargs) if isinstance(target, str) else target(*node_args, **kwargs)
    assert isinstance(target, str) or target in allowlist.FUNCTION_NAMES
    assert count(node_args, kwargs) * x.numel() >= made.numel()


@pytest.mark.parametrize("module, x", [
    (nn.Conv2d(2, 3, 1, padding=(2, 4)), torch.randn(1, 2, 2, 2)),
    (nn.Conv1d(2, 3, 3, padding="same"), torch.randn(1, 2, 5)),
    (nn.ConvTranspose2d(2, 3, 3, stride=3, output_padding=2, dilation=1), torch.randn(1, 2, 2, 2)),
    (nn.ConvTranspose1d(2, 1, 2, stride=5, dilation=2), torch.randn(1, 2, 3)),
    (nn.AdaptiveAvgPool2d((7, None)), torch.randn(1, 2, 3, 3)),
    (nn.AdaptiveAvgPool1d(9), torch.randn(1, 2, 3)),
], ids=lambda v: type(v).__name__)
def test_a_module_growth_count_bounds_what_its_forward_creates(module, x):
    count = allowlist.MODULE_CREATED_ELEMENTS[type(module)](module)
    assert count * max(x.numel(), module.weight.numel() if hasattr(module, "weight") else 0) >= module(x).numel()


def test_python_values_a_file_repeats_count_their_size():
    """The dry run computes calls on constants for real: `[0] * n` and `7 ** n` count what they make."""
    mul, power = allowlist.CREATED_ELEMENTS[operator.mul], allowlist.CREATED_ELEMENTS[operator.pow]
    assert mul(([0, 1], 5), {}) == len([0, 1] * 5) and mul((3, "ab"), {}) == len(3 * "ab")
    assert mul((3, 4), {}) == 1 and mul((2.5, 4), {}) == 1
    assert power((7, 100), {}) >= (7 ** 100).bit_length() and power((2.0, 3), {}) == 1


def _saved_call(target, x, args, kwargs=None):
    graph = fx.Graph()
    node = graph.placeholder("x")
    made = (graph.call_method(target, (node, *args), kwargs or {}) if isinstance(target, str)
            else graph.call_function(target, (node, *args), kwargs or {}))
    graph.output(made)
    return to_bytes(fx.GraphModule(nn.Module(), graph), example_inputs=(x,))


def _with_huge(data, edit):
    manifest = read_manifest(data)
    edit(manifest)
    return with_manifest(data, manifest)


def _call_args(manifest):
    return next(n for n in manifest["graph"] if n["op"] in ("call_function", "call_method"))["args"]["t"]


_HUGE = 1 << 40
# name -> (file of a small call, its edit to a size of 2**40 written in the file)
_HOSTILE_GROWTHS = {
    "pad": (lambda: _saved_call(F.pad, torch.randn(1, 4), ((0, 3),)),
            lambda m: _call_args(m).__setitem__(1, {"t": [0, _HUGE]})),
    "repeat_interleave": (lambda: _saved_call(torch.repeat_interleave, torch.randn(4), (3,)),
                          lambda m: _call_args(m).__setitem__(1, _HUGE)),
    "repeat": (lambda: _saved_call("repeat", torch.randn(2, 2), (2, 3)),
               lambda m: _call_args(m).__setitem__(slice(1, 3), [10 ** 6, 10 ** 6])),
    "tile": (lambda: _saved_call(torch.tile, torch.randn(2, 2), ((2, 3),)),
             lambda m: _call_args(m).__setitem__(1, {"t": [_HUGE, 1]})),
    "tile_method": (lambda: _saved_call("tile", torch.randn(2, 2), (2, 3)),
                    lambda m: _call_args(m).__setitem__(2, _HUGE)),
    "repeat_interleave_method": (lambda: _saved_call("repeat_interleave", torch.randn(4), (3,)),
                                 lambda m: _call_args(m).__setitem__(1, _HUGE)),
    "one_hot": (lambda: _saved_call(F.one_hot, torch.tensor([0, 1]), (3,)),
                lambda m: _call_args(m).__setitem__(1, _HUGE)),
    "interpolate": (lambda: _saved_call(F.interpolate, torch.randn(1, 1, 4), (None, 2.0)),
                    lambda m: _call_args(m).__setitem__(2, 1e12)),
    "adaptive_avg_pool2d": (lambda: _saved_call(F.adaptive_avg_pool2d, torch.randn(1, 1, 2, 2), ((2, 2),)),
                            lambda m: _call_args(m).__setitem__(1, {"t": [_HUGE, _HUGE]})),
    "list_times": (lambda: _saved_call(operator.add, torch.randn(2), (1,)),
                   lambda m: _to_constant_call(m, "operator.mul", [[0], 50_000_000])),
    "power": (lambda: _saved_call(operator.add, torch.randn(2), (1,)),
              lambda m: _to_constant_call(m, "operator.pow", [7, 20_000_000])),
}


def _to_constant_call(manifest, function, args):
    """The call becomes `function(*args)` on constants, its result returned beside the input."""
    call = next(n for n in manifest["graph"] if n["op"] == "call_function")
    call.update(target=function, args={"t": args})
    output = manifest["graph"][-1]
    output["args"] = {"t": [{"t": [{"n": manifest["graph"][0]["name"]}, {"n": call["name"]}]}]}


@pytest.mark.parametrize("name", sorted(_HOSTILE_GROWTHS))
def test_a_file_writing_a_huge_growth_is_refused_before_anything_runs(name):
    """A few hundred bytes naming a size of 2**40 (or a list repeated 5e7 times, an integer with 6e7
    bits, which the dry run would compute for real) are refused by name, at once and without memory."""
    make, edit = _HOSTILE_GROWTHS[name]
    data = make()
    from_bytes(data)  # the small call loads
    hostile = _with_huge(data, edit)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(FormatError, match=r"graph node '\w+'.* would create \d+ elements from sizes the file states"):
        from_bytes(hostile)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 20 * 2 ** 20, (seconds, peak)


@pytest.mark.parametrize("module, x, field, value", [
    (nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), "padding", [_HUGE, 0]),
    (nn.ConvTranspose2d(1, 1, 1), torch.randn(1, 1, 2, 2), "stride", [_HUGE, _HUGE]),
    (nn.AdaptiveAvgPool2d(2), torch.randn(1, 1, 2, 2), "output_size", [_HUGE, _HUGE]),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_a_module_whose_configuration_writes_a_huge_growth_is_refused(module, x, field, value):
    data = to_bytes(fx.symbolic_trace(nn.Sequential(module)), example_inputs=(x,))
    from_bytes(data)

    def edit(manifest):
        entry = next(e for e in manifest["modules"] if e["path"] == "0")
        entry["config"][field] = {"t": value}
    with pytest.raises(FormatError, match=r"graph node '\w+'.* would create \d+ elements from sizes the file states"):
        from_bytes(_with_huge(data, edit))
