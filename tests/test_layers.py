import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import (FUNCTIONS, KINDS, WeightTransform, bias_arg, chain_transforms, effective_weight,
                               find_layers, functionalize, input_arg, insert_on_weight, kind_names, kind_of_node, kind_of_type,
                               layer_kind, layer_node, select_layers, stored_attr, submodule, weight_arg,
                               weight_source)
from fxcompress.tracing import trace
from layer_cases import TiedHead, TransposedWithOutputSize


def test_functional_form_is_equivalent_on_zoo(zoo_model):
    name, model, inputs = zoo_model
    gm = trace(model)
    layers = find_layers(gm)
    assert layers, name
    for layer in layers:
        functionalize(gm, layer_node(gm, layer))
    gm.recompile()
    after = find_layers(gm)
    assert [(l.name, l.kind, l.weight, l.bias) for l in after] == [(l.name, l.kind, l.weight, l.bias) for l in layers]
    with torch.no_grad():
        assert torch.allclose(gm(*inputs), model(*inputs), atol=1e-6), name


@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, stride=2), (2, 4, 9, 9)),
    (nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1, groups=3), (2, 3, 5, 5)),
    (nn.Conv1d(3, 5, 3, bias=False), (2, 3, 10)),
    (nn.Conv3d(2, 3, 3), (1, 2, 5, 5, 5)),
])
def test_functionalize_keeps_every_conv_option(module, shape):
    model = nn.Sequential(module).eval()
    gm = trace(model)
    (layer,) = find_layers(gm)
    functionalize(gm, layer_node(gm, layer))
    gm.recompile()
    x = torch.randn(shape)
    assert all(n.op != "call_module" for n in gm.graph.nodes)
    assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_insert_on_weight_and_effective_weight():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    gm = trace(model)
    (layer,) = find_layers(gm)
    node = insert_on_weight(gm, layer, lambda g, w: g.call_function(operator.mul, (w, 0.5)))
    gm.recompile()
    assert node.target is operator.mul
    assert torch.equal(effective_weight(gm, layer), model[0].weight.detach() * 0.5)
    (again,) = find_layers(gm)
    assert again.weight == "0.weight" and weight_source(layer_node(gm, again)).target == "0.weight"


class Doubler(WeightTransform):
    bits = 5

    def forward(self, w):
        return w * 2


class StoredWeight(WeightTransform):
    """A transform with no input that produces the weight itself (as an encoded weight does)."""

    def __init__(self, weight):
        super().__init__()
        self.value = nn.Parameter(weight.clone())

    def forward(self):
        return self.value


def test_chain_transforms_and_generator_sources():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    gm = trace(model)
    (layer,) = find_layers(gm)
    gm.add_submodule("0.doubler", Doubler())
    insert_on_weight(gm, layer, lambda g, w: g.call_module("0.doubler", (w,)))
    gm.recompile()
    node = layer_node(gm, find_layers(gm)[0])
    assert [type(t).__name__ for t in chain_transforms(gm, node)] == ["Doubler"]
    # replace the whole chain by a generator module: the layer is still found, named by its owner
    gm.add_submodule("0.weight_encoded", StoredWeight(model[0].weight.detach() * 2))
    with gm.graph.inserting_before(node):
        generated = gm.graph.call_module("0.weight_encoded", ())
    node.replace_input_with(node.args[1], generated)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    (layer,) = find_layers(gm)
    assert layer.name == "0" and layer.weight == "0.weight_encoded"
    x = torch.randn(2, 4)
    assert torch.allclose(gm(x), F.linear(x, model[0].weight * 2, model[0].bias))


def test_dynamic_weights_are_not_layers():
    class Dynamic(nn.Module):
        def forward(self, x, w):
            return F.linear(x, w)

    assert find_layers(trace(Dynamic())) == []


def _built(kind) -> nn.Module:
    """A small module of `kind` with 2 input and 3 output channels (an embedding: 2 rows of 3)."""
    return kind.module(2, 3) if not kind.is_conv else kind.module(2, 3, 1)


def _example(kind, weight) -> torch.Tensor:
    if kind.family == "embedding":
        return torch.tensor([[0, 1, 1]])
    return torch.randn(1, 2) if not kind.is_conv else torch.randn(1, 2, *(4,) * (weight.ndim - 2))


@pytest.mark.parametrize("name", sorted(name for name, kind in KINDS.items() if kind.module is not None))
def test_each_layer_kind_entry_agrees_with_torch(name):
    kind = KINDS[name]
    module = _built(kind).eval()
    assert layer_kind(module) == kind_of_type(type(module)) == name
    weight = module.weight
    assert weight.shape[kind.out_dim] == 3  # the table's channel dims
    assert kind.in_dim is None if kind.family == "embedding" else weight.shape[kind.in_dim] == 2
    gm = trace(nn.Sequential(module))
    node = functionalize(gm, layer_node(gm, find_layers(gm)[0]))
    gm.recompile()
    assert node.target is kind.function and kind_of_node(gm, node) is kind
    assert weight_arg(node) is node.args[kind.weight_pos] and input_arg(node) is node.args[kind.input_pos]
    assert bias_arg(node) is (node.args[kind.bias_pos] if kind.bias_pos is not None else None)
    x = _example(kind, weight)
    with torch.no_grad():
        assert torch.allclose(gm(x), module(x), atol=1e-6)


class HFConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def test_addmm_with_a_stored_weight_is_a_linear_layer_with_the_transposed_layout():
    kind = KINDS["addmm"]
    gm = trace(HFConv1D())
    (layer,) = find_layers(gm)
    node = layer_node(gm, layer)
    assert (layer.kind, layer.weight, layer.bias) == ("addmm", "weight", "bias") and kind_of_node(gm, node) is kind
    assert gm.weight.shape[kind.out_dim] == 3 and gm.weight.shape[kind.in_dim] == 2 and kind.is_transposed
    assert weight_arg(node).target == "weight" and bias_arg(node).target == "bias" and input_arg(node).op == "placeholder"
    x = torch.randn(4, 2)
    torch.testing.assert_close(gm(x), F.linear(x, gm.weight.t(), gm.bias))


def test_an_embedding_with_max_norm_is_refused_by_name():
    gm = trace(nn.Sequential(nn.Embedding(4, 3, max_norm=1.0)))
    with pytest.raises(PreconditionError, match="embedding '0' has max_norm"):
        functionalize(gm, layer_node(gm, find_layers(gm)[0]))


def test_a_subclass_is_no_layer_kind_and_functions_are_the_table():
    class Scaled(nn.Linear):  # may override forward: never functionalized as a plain linear
        pass

    assert kind_of_type(Scaled) is None and kind_of_type(nn.ReLU) is None
    assert FUNCTIONS == {kind.function: name for name, kind in KINDS.items()}


def test_kind_names_accept_names_and_classes():
    assert kind_names((nn.ConvTranspose2d, "linear")) == ("conv_transpose2d", "linear")
    assert kind_names(nn.Conv1d) == ("conv1d",)


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).flatten(1)[:, :8]))


def test_select_layers_filters_by_kind_and_name_and_names_the_layers_when_nothing_matches():
    gm = trace(TwoBranches())
    assert [l.name for l in select_layers(gm, "P")] == ["conv", "fc1", "fc2"]
    assert [l.name for l in select_layers(gm, "P", ("linear",))] == ["fc1", "fc2"]
    assert [l.name for l in select_layers(gm, "P", ("linear",), "fc2")] == ["fc2"]
    with pytest.raises(ConfigError, match=r"P selects no layer .*\['conv', 'fc1', 'fc2'\]"):
        select_layers(gm, "P", ("conv1d",))
    with pytest.raises(ConfigError, match="P selects no layer"):
        select_layers(gm, "P", (), "fc")  # a full match: "fc" names no layer
    assert select_layers(trace(nn.Sequential(nn.ReLU())), "P") == []
    with pytest.raises(ConfigError, match="P selects no layer"):
        select_layers(trace(nn.Sequential(nn.ReLU())), "P", required=True)


class _Shadowing(nn.Module):
    """Submodules that attribute lookup does not find where `_modules` holds them."""

    head = nn.Identity()  # a class attribute named like a submodule: getattr finds this one

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 2))
        self._modules["head"] = nn.Linear(2, 2)
        self._modules["twin"] = nn.Linear(2, 2)
        self._parameters["twin"] = nn.Parameter(torch.ones(1))  # a parameter of the same name wins
        self._modules["gone"] = None
        self.plain = object()


class _Redirecting(nn.Module):
    elsewhere = nn.Identity()

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def __getattr__(self, name):  # a custom lookup: only get_submodule's own answer stands
        return type(self).elsewhere if name == "inner" else super().__getattr__(name)


def _outcome(fn):
    try:
        return ("value", id(fn()))
    except Exception as exc:  # noqa: BLE001 - the error type and message are the outcome compared
        return ("error", type(exc), str(exc))


@pytest.mark.parametrize("root", [_Shadowing(), nn.Sequential(_Redirecting(), nn.Sequential(nn.Linear(2, 2)))])
def test_submodule_and_stored_attr_answer_as_torch_does(root):
    # layer lookups resolve paths through `_modules` directly; every path where attribute lookup would
    # answer otherwise (shadowed, redirected, missing, not a module) must give torch's answer or error
    paths = ["", "body", "body.0", "body.0.weight", "body.1", "head", "twin", "gone", "plain", "plain.x",
             "missing.weight", "0", "0.inner", "0.inner.weight", "1.0", "1.0.bias", "1.0.nothing"]
    compared = 0
    for path in paths:
        assert _outcome(lambda: submodule(root, path)) == _outcome(lambda: root.get_submodule(path)), path
        if path:
            assert _outcome(lambda: stored_attr(root, path)) == _outcome(lambda: operator.attrgetter(path)(root)), path
            compared += 1
    assert compared == len(paths) - 1


def test_a_stale_layer_is_found_by_the_first_layer_with_its_weight_or_name(zoo_model):
    # layer_node reads the graph only up to the first match: the node find_layers' list would give
    name, model, _ = zoo_model
    gm = trace(model)
    layers = find_layers(gm)
    for layer in layers:
        insert_on_weight(gm, layer, lambda graph, w: graph.call_function(torch.neg, (w,)))
    after = find_layers(gm)
    for layer in layers:
        assert all(n.name != layer.node for n in gm.graph.nodes) or layer.kind == "addmm", (name, layer)
        first = next(f for f in after if f.weight == layer.weight or f.name == layer.name)
        assert layer_node(gm, layer).name == first.node, (name, layer)


def _quantized_and_encoded_models():
    import fxcompress
    from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    batches = [torch.randn(32, 16) for _ in range(2)]
    compile_ = lambda passes: fxcompress.compile(model, passes, example_inputs=(batches[0],),  # noqa: E731
                                                 calibration_data=batches)
    quantized = compile_([InsertFakeQuant(method="kmeans", bits=3)])
    encoded = compile_([InsertMasks(sparsity=0.5), InsertFakeQuant(method="kmeans", bits=3), LowerToEncoded()])
    return quantized, encoded, batches


@pytest.mark.parametrize("name", ["SparseGPT", "ScaleChannels", "InsertMasks"])
def test_passes_that_rewrite_stored_float_weights_refuse_quantized_or_encoded_ones(name):
    """SparseGPT's update or ScaleChannels' scales folded under a quantizer would not be what the layer computes
    (SparseGPT used to rewrite the float weight under a k-means codebook and report an error it did not reach);
    masks may sit on a quantized weight but not on encoded bytes (InsertMasks and SparseGPT raised AttributeError)."""
    import fxcompress
    from fxcompress import passes
    p = {"SparseGPT": passes.SparseGPT(), "ScaleChannels": passes.ScaleChannels(method="smoothquant"),
         "InsertMasks": passes.InsertMasks(sparsity=0.5)}[name]
    quantized, encoded, batches = _quantized_and_encoded_models()
    run = lambda gm: fxcompress.compile(gm, [p], example_inputs=(batches[0],), calibration_data=batches)  # noqa: E731
    with pytest.raises(PreconditionError, match=rf"{name}: layer '0' \(0\.weight_encoded\) is already quantized or "
                                                rf"encoded \(EncodedWeight\); run {name} before"):
        run(encoded)
    if name == "InsertMasks":
        masked = run(quantized)
        kept = masked.get_buffer("0.weight_mask")
        assert float(kept.float().mean()) == 0.5 and not effective_weight(masked, find_layers(masked)[0])[~kept].any()
    else:
        with pytest.raises(PreconditionError, match=rf"{name}: layer '0' \(0\.weight\) is already quantized or "
                                                    rf"encoded \(KMeansWeight\); run {name} before InsertFakeQuant"):
            run(quantized)


class _TwoWeightsOneModule(nn.Module):
    """Attention-style projections: two stored weights of one module, each used by a functional linear."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return F.linear(x, self.wq) * F.linear(x, self.wk)


class _HoldsAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _TwoWeightsOneModule()

    def forward(self, x):
        return self.attn(x)


def test_two_functional_weights_of_one_module_are_two_layers_with_their_own_statistics():
    import fxcompress
    from fxcompress.passes import InsertMasks
    from fxcompress.pruning import get_mask
    gm = trace(_HoldsAttention())
    assert [(l.name, l.weight) for l in find_layers(gm)] == [("attn.wq", "attn.wq"), ("attn.wk", "attn.wk")]
    # both named "attn", the second layer's sparsity overwrote the first's in the pass's statistics
    rules = [("attn.wq", "element", 0.25), ("attn.wk", "element", 0.75)]
    gm = fxcompress.compile(_HoldsAttention(), [InsertMasks(rules=rules)], example_inputs=(torch.randn(2, 8),))
    assert fxcompress.history(gm)[-1].stats["layers"] == {"attn.wq": 0.25, "attn.wk": 0.75}
    assert {l.name: 1 - get_mask(gm, l).float().mean().item() for l in find_layers(gm)} == \
        {"attn.wq": 0.25, "attn.wk": 0.75}
    # a module's single functional weight keeps the module's name (as a module layer is named)
    assert [l.name for l in find_layers(trace(nn.Sequential(nn.Linear(2, 2))))] == ["0"]


def test_selecting_only_a_tied_layer_says_it_is_tied_and_names_its_first_layer():
    gm = trace(TiedHead())
    # the selection used to drop the tied layer first, then say "selects no layer" while listing it
    with pytest.raises(ConfigError, match=r"P \(select='lm_head', types=\(\)\) selects only tied layers: 'lm_head' "
                                          r"\(tied to 'embed'\).*select 'embed' instead"):
        select_layers(gm, "P", (), "lm_head")
    assert [l.name for l in select_layers(gm, "P", (), "embed|lm_head")] == ["embed"]  # handled once, by its first
    assert [l.name for l in select_layers(gm, "P", ("linear",))] == ["fc"]


def test_a_compressing_pass_warns_when_its_selection_leaves_a_tied_head_as_it_is():
    import warnings

    import fxcompress
    from fxcompress.errors import TiedLayerWarning
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    tokens = torch.randint(0, 16, (2, 5))
    for compress in (InsertMasks(sparsity=0.5, types=("linear",)), InsertFakeQuant(bits=4, types=("linear",))):
        # "linear" names the head too, but its weight is the embedding table, which is not selected: the
        # head stayed float without a word
        with pytest.warns(TiedLayerWarning, match=r"leaves out 'lm_head': its weight is the very tensor of 'embed'"):
            gm = fxcompress.compile(TiedHead(), [compress], example_inputs=(tokens,))
        assert fxcompress.history(gm)[-1].params_touched == ("fc.weight",)
    with warnings.catch_warnings():  # selecting the first layer too compresses the tied weight once: no warning
        warnings.simplefilter("error", TiedLayerWarning)
        fxcompress.compile(TiedHead(), [InsertMasks(sparsity=0.5, select="embed|fc|lm_head")], example_inputs=(tokens,))
        select_layers(trace(TiedHead()), "P", ("linear",))  # a bare selection (lowerings handle heads themselves)


class _KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(input=self.conv(input=x).mean((2, 3)))


def test_modules_called_with_input_as_a_keyword_are_functionalized():
    model = _KeywordCalls().eval()
    gm = trace(model)
    for layer in find_layers(gm):  # raised IndexError reading node.args[0]
        functionalize(gm, layer_node(gm, layer))
    gm.recompile()
    x = torch.randn(2, 3, 6, 6)
    assert all(n.op != "call_module" for n in gm.graph.nodes)
    assert torch.allclose(gm(x), model(x), atol=1e-6)


def test_a_conv_transpose_called_with_output_size_is_refused_by_name():
    gm = trace(TransposedWithOutputSize())
    with pytest.raises(PreconditionError, match="ConvTranspose2d 'up' is called with output_size"):
        functionalize(gm, layer_node(gm, find_layers(gm)[0]))
