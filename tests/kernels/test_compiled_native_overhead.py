"""What a compiled native model pays per call in our code: `fxcompress::q8_linear` inside a torch.compile
graph finds its layer by the identity of the tensors the graph holds as constants (no address read per
call, no checked fallback), and gives eager native's output bit for bit. The timing of the compiled call
against eager native and fp32 is benchmarks/bench_compiled_native.py's, not a unit test's."""
import pytest
import torch

from fxcompress.kernels import q8
from fxcompress.kernels.native import NativeLayer

pytestmark = pytest.mark.skipif(q8.c_library() is None, reason="no C compiler on this machine to build q8_linear")


def chain(seed=0):
    """Two c_int8 layers as a native model runs them: float input quantized in the first, codes between,
    float32 out of the second."""
    gen = torch.Generator().manual_seed(seed)
    first = NativeLayer("linear", [24, 40], 0.02, 0, "uint8", output_scale=0.05, output_zero_point=3,
                        clamp=(0.0, None), kernel="c_int8", input="float32", input_qmax=127)
    second = NativeLayer("linear", [10, 24], 0.05, 3, "float32", kernel="c_int8", input_qmax=255)
    for layer in (first, second):
        out, columns = layer.weight.shape
        layer.weight.copy_(torch.randint(-127, 128, (out, columns), generator=gen, dtype=torch.int8))
        layer.weight_scale.copy_(torch.rand(out, generator=gen) * 0.01 + 1e-3)
        layer.bias.copy_(torch.randint(-3000, 3000, (out,), generator=gen, dtype=torch.int32))
    return torch.nn.Sequential(first, second).eval()


def counting(monkeypatch):
    calls = {"addresses": 0, "checked": 0}
    arguments, eager = q8._arguments, q8.eager

    def by_address(*args):
        calls["addresses"] += 1
        return arguments(*args)

    def checked(*args):
        calls["checked"] += 1
        return eager(*args)
    monkeypatch.setattr(q8, "_arguments", by_address)
    monkeypatch.setattr(q8, "eager", checked)
    return calls


def test_a_compiled_graph_reaches_its_layers_by_identity_and_matches_eager_native(monkeypatch):
    model = chain()
    x = torch.rand(5, 40) * 2 - 0.5
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager", dynamic=False)
        compiled(x)  # traced here: the layers' packed arguments are registered while tracing
        calls = counting(monkeypatch)
        got = [compiled(x) for _ in range(3)]
    torch._dynamo.reset()
    assert all(torch.equal(y, want) for y in got)
    assert calls == {"addresses": 0, "checked": 0}  # every call took the identity path: one ctypes call a layer


def test_the_same_memory_through_another_tensor_object_is_still_found_by_address(monkeypatch):
    """A view of a layer's weight (another Python object, the same memory) is that layer: found by address, not
    recomputed through the checked path; a copy is not, and is checked."""
    layer = chain()[1]
    x = torch.randint(0, 256, (4, 24), dtype=torch.uint8)
    p = layer.c_packed()
    want = p.call(x)
    rest = (p.bias, p.mult, p.shift, p.scale, p.in_features, p.x_zero, p.y_zero, p.low, p.high, p.relu, p.raw,
            p.x_scale, p.x_qmax)
    calls = counting(monkeypatch)
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, p.weight, *rest), want)
    assert calls == {"addresses": 0, "checked": 0}
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, p.weight.view(p.weight.shape), *rest), want)
    assert calls["addresses"] > 0 and calls["checked"] == 0
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, p.weight.clone(), *rest), want)
    assert calls["checked"] == 1
