"""InsertMasks: exact sparsity and structure per granularity, global = torch's global_unstructured,
masks as graph nodes that survive training, advancing masks, rules and stages, every bad config."""
import operator

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import find_layers
from fxcompress.passes import InsertMasks
from fxcompress.pruning import AGP, get_mask, masked_layers
from fxcompress.pruning.importance import count_to_prune, group_layout, split_groups
from fxcompress.training import torch_threads
from fxcompress.zoo import ZOO, LeNet5, LeNet300100
from layer_cases import TiedHead, TransposedWithOutputSize


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: one thread is fastest, and does not stall on shared cores
        yield


def compile_zoo(name, *passes):
    make_model, make_input = ZOO[name]
    return fxcompress.compile(make_model(), list(passes), example_inputs=(make_input(),))


def masks_of(gm):
    return {layer.name: (layer, get_mask(gm, layer)) for layer in masked_layers(gm)}


def mask_muls(gm):
    return [n for n in gm.graph.nodes if n.target is operator.mul and n.args[1].op == "get_attr"
            and n.args[1].target.endswith("weight_mask")]


def groups_are_uniform(mask, dims):
    """Every group (indexed by `dims`) is all kept or all pruned."""
    reduce = tuple(d for d in range(mask.ndim) if d not in dims)
    if not reduce:
        return True
    return torch.equal(mask.amin(dim=reduce), mask.amax(dim=reduce))


@pytest.mark.parametrize("granularity", ["element", "kernel", "filter", "channel"])
@pytest.mark.parametrize("name", ["lenet5", "resnet", "mobilenetv2"])
def test_local_sparsity_is_exact_and_structured(name, granularity):
    types = ("conv2d",) if granularity == "kernel" else ()
    gm = compile_zoo(name, InsertMasks(sparsity=0.6, granularity=granularity, types=types))
    masks = masks_of(gm)
    assert masks, "no layer was masked"
    for layer, mask in masks.values():
        # a depthwise conv's (MobileNetV2) channels are its real input channels, one per conv group
        conv_groups = getattr(gm.get_submodule(layer.name), "groups", 1)
        dims, split = group_layout(granularity, layer.kind, mask.ndim, layer.name, conv_groups)
        mask = split_groups(mask, split)
        groups = 1
        for d in dims:
            groups *= mask.shape[d]
        group_size = mask.numel() // groups
        assert groups_are_uniform(mask, dims), f"{layer.name}: a {granularity} group is partly pruned"
        assert mask.numel() - mask.count_nonzero() == count_to_prune(0.6, groups) * group_size


@pytest.mark.parametrize("granularity", ["element", "filter", "channel"])
def test_global_sparsity_is_exact_over_all_groups(granularity):
    gm = compile_zoo("lenet300", InsertMasks(sparsity=0.8, granularity=granularity, scope="global"))
    masks = [m for _, m in masks_of(gm).values()]
    if granularity == "element":
        total = sum(m.numel() for m in masks)
        assert total - sum(m.count_nonzero().item() for m in masks) == round(0.8 * total)
    else:
        dim = 0 if granularity == "filter" else 1
        groups = [(m.amax(dim=1 - dim) == 0) for m in masks]
        assert sum(g.sum().item() for g in groups) == round(0.8 * sum(g.numel() for g in groups))


def test_global_equals_torch_global_unstructured():
    torch.manual_seed(1)
    model, x = LeNet5(), torch.randn(2, 1, 28, 28)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.83, scope="global")], example_inputs=(x,))
    reference = LeNet5()
    reference.load_state_dict(model.state_dict())
    params = [(m, "weight") for m in (reference.conv1, reference.conv2, reference.fc1, reference.fc2)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.83)
    for layer, mask in masks_of(gm).values():
        assert torch.equal(mask, reference.get_submodule(layer.name).weight_mask), layer.name
    assert torch.allclose(gm(x), reference(x), atol=1e-6)


def test_local_l1_equals_torch_l1_unstructured_and_ln_structured():
    torch.manual_seed(2)
    model, x = LeNet5(), torch.randn(2, 1, 28, 28)
    element = fxcompress.compile(model, [InsertMasks(sparsity=0.3)], example_inputs=(x,))
    filters = fxcompress.compile(model, [InsertMasks(sparsity=0.3, granularity="filter", importance="l2",
                                                     select="conv2")], example_inputs=(x,))
    reference = LeNet5()
    reference.load_state_dict(model.state_dict())
    prune.l1_unstructured(reference.fc1, "weight", amount=0.3)
    prune.ln_structured(reference.conv2, "weight", amount=0.3, n=2, dim=0)
    assert torch.equal(get_mask(element, find_layers(element)[2]), reference.fc1.weight_mask)
    assert torch.equal(masks_of(filters)["conv2"][1], reference.conv2.weight_mask)


def test_masks_are_graph_nodes_and_buffers_named_like_torch_prune():
    gm = compile_zoo("lenet300", InsertMasks(sparsity=0.5))
    assert len(mask_muls(gm)) == 3
    assert {"fc1.weight_mask", "fc2.weight_mask", "fc3.weight_mask"} <= set(gm.state_dict())
    x = torch.randn(4, 784)
    dense = LeNet300100()
    dense.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.endswith("_mask")})
    assert torch.allclose(gm(x), dense(x), atol=1e-6)  # stored weights are zeroed where pruned too
    assert (gm.fc1.weight == 0).sum() == (gm.fc1.weight_mask == 0).sum()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum", "adam", "adamw-weight-decay"])
def test_pruned_weights_stay_zero_through_100_steps(make_optimizer):
    # a pruned weight's gradient is zero through the mask whatever the batch: 4 samples keep the 300 steps quick
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    gm = fxcompress.compile(LeNet5(1, 8, 10), [InsertMasks(sparsity=0.7, scope="global")], example_inputs=(x,))
    masks = {layer.weight: mask.clone() for layer, mask in masks_of(gm).values()}
    # each weight's pruned positions, found once: a boolean index of the gradient every step cost a
    # quarter of the steps' time, gathering the same positions costs a fifth of that
    pruned = {name: (gm.get_parameter(name), (mask == 0).reshape(-1).nonzero().squeeze(1))
              for name, mask in masks.items()}
    optimizer = make_optimizer(gm.parameters())
    gm.train()
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(gm(x), y).backward()
        for name, (weight, positions) in pruned.items():
            assert not weight.grad.reshape(-1).index_select(0, positions).any(), f"{name}: pruned weight has a gradient"
        optimizer.step()
    for layer in masked_layers(gm):
        effective = fxcompress.layers.effective_weight(gm, layer)
        assert not effective[masks[layer.weight] == 0].any()
        assert effective[masks[layer.weight] == 1].count_nonzero() > 0.9 * masks[layer.weight].sum()


def test_recompiling_advances_masks_without_stacking():
    gm = compile_zoo("lenet300", InsertMasks(sparsity=0.5))
    first = {k: m.clone() for k, (_, m) in masks_of(gm).items()}
    gm2 = fxcompress.compile(gm, [InsertMasks(sparsity=0.8)], example_inputs=(torch.randn(2, 784),))
    assert len(mask_muls(gm2)) == 3
    for name, (_, mask) in masks_of(gm2).items():
        assert not mask[first[name] == 0].any(), "a pruned weight came back"
        assert mask.numel() - mask.count_nonzero() == round(0.8 * mask.numel())
    lower = fxcompress.compile(gm2, [InsertMasks(sparsity=0.3)], example_inputs=(torch.randn(2, 784),))
    assert fxcompress.history(lower)[-1].changed is False
    for name, (_, mask) in masks_of(lower).items():
        assert torch.equal(mask, masks_of(gm2)[name][1])


def test_structured_after_element_keeps_earlier_zeros():
    gm = compile_zoo("lenet5", InsertMasks(sparsity=0.5, select="conv2"))
    before = masks_of(gm)["conv2"][1].clone()
    gm = fxcompress.compile(gm, [InsertMasks(sparsity=0.5, granularity="filter", select="conv2")],
                            example_inputs=(torch.randn(1, 1, 28, 28),))
    after = masks_of(gm)["conv2"][1]
    assert not after[before == 0].any()
    assert (after.flatten(1).amax(dim=1) == 0).sum() == 25


def test_select_types_rules_and_stages(tmp_path):
    gm = compile_zoo("lenet5", InsertMasks(sparsity=0.5, types=(nn.Linear,)))
    assert sorted(masks_of(gm)) == ["fc1", "fc2"]
    gm = compile_zoo("lenet5", InsertMasks(sparsity=(0.2, 0.4), stage=1, select="conv.*"))
    assert {k: round(1 - m.count_nonzero().item() / m.numel(), 2) for k, (_, m) in masks_of(gm).items()} == \
        {"conv1": 0.4, "conv2": 0.4}
    rule_file = tmp_path / "lenet5.rule"
    rule_file.write_text("# parameter granularity sparsity-per-stage [importance]\n"
                         "conv1\\.weight  filter  0.1,0.25\n"
                         "fc.*            element 0.5,0.9  l2\n")
    gm = compile_zoo("lenet5", InsertMasks(rules=rule_file, stage=1))
    masks = masks_of(gm)
    assert sorted(masks) == ["conv1", "fc1", "fc2"]
    assert (masks["conv1"][1].flatten(1).amax(dim=1) == 0).sum() == 5
    assert masks["fc1"][1].numel() - masks["fc1"][1].count_nonzero() == round(0.9 * masks["fc1"][1].numel())


def test_callable_importance_decides_what_is_pruned():
    gm = compile_zoo("lenet300", InsertMasks(sparsity=0.5, select="fc3",
                                             importance=lambda w: torch.arange(w.numel()).view_as(w).float()))
    mask = masks_of(gm)["fc3"][1].flatten()
    assert not mask[:500].any() and mask[500:].all()


def test_agp_schedule_from_a_plain_loop_is_monotone_and_reaches_the_target():
    masks = InsertMasks(sparsity=0.9, scope="global", schedule=AGP(begin=0, end=20, every=5))
    gm = compile_zoo("lenet300", masks)
    assert fxcompress.history(gm)[-1].stats["sparsity"] == 0.0 and len(mask_muls(gm)) == 3
    previous, seen = {k: m.clone() for k, (_, m) in masks_of(gm).items()}, []
    for step in range(0, 30):
        layers = masks.update_masks(gm, step)
        current = {k: m.clone() for k, (_, m) in masks_of(gm).items()}
        for k in current:
            assert not current[k][previous[k] == 0].any(), "a pruned weight came back"
        total = sum(m.numel() for m in current.values())
        seen.append(1 - sum(m.count_nonzero().item() for m in current.values()) / total)
        previous = current
        assert set(layers) == {"fc1", "fc2", "fc3"}
    assert seen == sorted(seen) and len(set(seen)) == 5
    assert seen[-1] == pytest.approx(0.9, abs=1e-6)
    assert seen[10] == pytest.approx(0.9 + (0.0 - 0.9) * (1 - 10 / 20) ** 3, abs=1e-5)


def test_update_masks_needs_compiled_masks():
    gm = compile_zoo("lenet300")
    with pytest.raises(PreconditionError, match="compile the model with this InsertMasks pass first"):
        InsertMasks(sparsity=0.5).update_masks(gm, 0)


def test_kernel_granularity_on_a_linear_layer_is_refused():
    with pytest.raises(PreconditionError, match="granularity 'kernel' needs a conv layer; fc1 is linear"):
        compile_zoo("lenet300", InsertMasks(granularity="kernel"))


def test_conv_transpose_filters_are_output_channels():
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3))
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, granularity="filter")],
                            example_inputs=(torch.randn(1, 4, 5, 5),))
    mask = masks_of(gm)["0"][1]  # (in=4, out=6, 3, 3)
    assert (mask.transpose(0, 1).flatten(1).amax(dim=1) == 0).sum() == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.5}, "InsertMasks.sparsity must be in"),
    ({"sparsity": "half"}, "InsertMasks.sparsity must be a number"),
    ({"sparsity": (0.1, 0.2), "stage": 2}, "stage 2 asked for, but only 2 sparsities"),
    ({"granularity": "row"}, "InsertMasks.granularity must be one of"),
    ({"importance": "l3"}, "InsertMasks.importance must be one of"),
    ({"scope": "everywhere"}, "InsertMasks.scope must be one of"),
    ({"stage": -1}, "InsertMasks.stage must be in"),
    ({"select": "fc(("}, "not a valid regular expression"),
    ({"select": 3}, "InsertMasks.select must be a regular expression"),
    ({"types": ("lstm",)}, "InsertMasks.types: 'lstm' is not a maskable layer type"),
    ({"types": (nn.ReLU,)}, "is not a maskable layer type"),
    ({"schedule": 10}, "InsertMasks.schedule must be an AGP"),
    ({"rules": [("fc1.weight", "element", 0.5)], "scope": "global"}, "need scope='local'"),
    ({"rules": [("fc1.weight", "elementt", 0.5)]}, "InsertMasks.rules[0]: field 'granularity'"),
    ({"rules": [("fc1.weight", "element", [0.5, 0.6])], "stage": 2}, "InsertMasks.rules[0]: stage 2 asked for"),
])
def test_bad_config_raises_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        InsertMasks(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"select": "conv.*"}, "InsertMasks selects no layer"),
    ({"types": ("conv2d",)}, "InsertMasks selects no layer"),
    ({"rules": [("fc.*", "element", 0.5), ("conv1.weight", "element", 0.5)]}, "matches no name"),
])
def test_selections_that_match_nothing_are_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        compile_zoo("lenet300", InsertMasks(**kwargs))


def test_bad_agp_config():
    with pytest.raises(ConfigError, match="AGP.end must be after AGP.begin"):
        AGP(begin=10, end=5)
    with pytest.raises(ConfigError, match="AGP.every"):
        AGP(end=5, every=0)
    with pytest.raises(ConfigError, match="AGP.initial"):
        AGP(end=5, initial=2.0)


def test_the_pass_config_is_plain_data_and_frozen():
    p = InsertMasks(sparsity=[0.2, 0.5], types=[nn.Conv2d], schedule=AGP(end=10))
    assert p.sparsity == (0.2, 0.5) and p.types == ("conv2d",)
    assert p.config()["types"] == ["conv2d"]
    with pytest.raises(AttributeError):
        p.sparsity = 0.9
    hash(p)


def test_update_masks_checks_its_step():
    masks = InsertMasks(sparsity=0.5)
    gm = compile_zoo("lenet300", masks)
    with pytest.raises(ConfigError, match="update_masks.step"):
        masks.update_masks(gm, -1)
    assert masks.update_masks(gm, 3) == {"fc1": 0.5, "fc2": 0.5, "fc3": 0.5}


def test_global_kernel_pruning_counts_kernels_across_convs():
    gm = compile_zoo("lenet5", InsertMasks(sparsity=0.7, granularity="kernel", scope="global", types=("conv2d",)))
    masks = [m for _, m in masks_of(gm).values()]
    kernels = [m.flatten(2).amax(dim=2) for m in masks]  # one entry per (out, in) kernel
    assert all(groups_are_uniform(m, (0, 1)) for m in masks)
    assert sum((k == 0).sum().item() for k in kernels) == round(0.7 * sum(k.numel() for k in kernels))


def test_a_rule_shadowed_by_an_earlier_rule_is_refused_at_its_line(tmp_path):
    # "fc3.weight 0.9" after "fc.* 0.5": first match wins, so fc3 was silently pruned to 0.5
    rule_file = tmp_path / "prune.rule"
    rule_file.write_text("fc.*  element 0.5\nfc3\\.weight  element 0.9\n")
    with pytest.raises(ConfigError, match=r"prune.rule:2: .* never applies: .* taken by the earlier rule at "
                                          r"prune.rule:1"):
        compile_zoo("lenet300", InsertMasks(rules=rule_file))


def test_rules_that_hold_no_rule_are_refused(tmp_path):
    # an empty list or a file of comments pruned nothing and reported no change
    with pytest.raises(ConfigError, match="InsertMasks.rules is an empty list, so it would select nothing"):
        InsertMasks(rules=[])
    rule_file = tmp_path / "prune.rule"
    rule_file.write_text("# every rule commented out\n# fc1\\.weight element 0.5\n")
    with pytest.raises(ConfigError, match="prune.rule: InsertMasks.rules rule file holds no rule"):
        InsertMasks(rules=rule_file)


def test_a_rule_for_a_tied_layer_says_it_is_tied():
    # it said the pattern "matches no name" and listed names without lm_head.weight
    masks = InsertMasks(rules=[("fc.weight", "element", 0.5), ("lm_head.weight", "element", 0.5)])
    with pytest.raises(ConfigError, match=r"InsertMasks.rules\[1\]: .*'lm_head.weight' only, the weight of layer "
                                          r"'lm_head', which is tied to 'embed'.*write the rule for 'embed.weight'"):
        fxcompress.compile(TiedHead(), [masks], example_inputs=(torch.randint(0, 16, (2, 5)),))


class _KeywordLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(input=x)


def test_a_layer_called_with_a_keyword_input_is_masked():
    torch.manual_seed(0)
    model, x = _KeywordLinear(), torch.randn(2, 8)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    (_, mask), = masks_of(gm).values()
    assert mask.numel() - mask.count_nonzero() == 32
    with torch.no_grad():
        assert torch.allclose(gm(x), nn.functional.linear(x, model.fc.weight * mask, model.fc.bias))


def test_a_conv_transpose_called_with_output_size_is_refused_by_module_path():
    with pytest.raises(PreconditionError, match="ConvTranspose2d 'up' is called with output_size"):
        fxcompress.compile(TransposedWithOutputSize(), [InsertMasks(sparsity=0.5)], example_inputs=(torch.randn(1, 4, 6, 6),))


def _lowest_real_channels(weight, conv_groups, sparsity):
    """Independent reference: keep mask pruning the round(s x n) lowest-L1 real channels of a grouped
    weight whose dim 1 holds one group's channels (a conv's inputs, a transposed conv's outputs); real
    channel g * dim1 + j is read by dim-0 rows of group g at column j. Ties: lowest channel first."""
    rows, per_group = weight.shape[0] // conv_groups, weight.shape[1]
    cells = [(slice(g * rows, (g + 1) * rows), j) for g in range(conv_groups) for j in range(per_group)]
    scores = torch.stack([weight[cell].abs().sum() for cell in cells])
    keep = torch.ones_like(weight, dtype=torch.bool)
    for i in torch.sort(scores, stable=True).indices[:round(sparsity * len(cells))].tolist():
        keep[cells[i]] = False
    return keep


@pytest.mark.parametrize("front", ["module", "export"])
@pytest.mark.parametrize("conv_groups, channels", [(4, 4), (2, 6), (3, 6)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_grouped_conv_channels_and_transposed_filters_are_real_channels(front, conv_groups, channels, sparsity):
    # dim 1 of a depthwise conv's weight has size 1: it used to be one "channel" for the whole layer, so
    # 0.5 pruned nothing and 0.6 everything; a grouped transposed conv's "filters" likewise spanned groups
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, groups=conv_groups),
                          nn.ConvTranspose2d(channels, 2 * channels, 3, groups=conv_groups))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 3).round())  # integer weights: tied scores, broken earliest channel first
    weights = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
    x = torch.randn(1, channels, 6, 6)
    source = model if front == "module" else torch.export.export(model, (x,))
    for kind, granularity, weight in (("conv2d", "channel", weights[0]), ("conv_transpose2d", "filter", weights[1])):
        gm = fxcompress.compile(source, [InsertMasks(sparsity=sparsity, granularity=granularity, types=(kind,))],
                                example_inputs=(x,))
        (layer, mask), = masks_of(gm).values()
        assert torch.equal(mask.bool(), _lowest_real_channels(weight, conv_groups, sparsity)), (kind, granularity)


def test_advancing_a_grouped_conv_keeps_its_pruned_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    x = torch.randn(1, 8, 6, 6)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.25, granularity="channel")], example_inputs=(x,))
    first = next(iter(masks_of(gm).values()))[1].clone()
    gm = fxcompress.compile(gm, [InsertMasks(sparsity=0.5, granularity="channel")], example_inputs=(x,))
    mask = next(iter(masks_of(gm).values()))[1]
    assert (mask.flatten(1).amax(1) == 0).sum() == 4 and not (mask & ~first).any()


def test_agp_reaches_its_target_at_end_from_a_loop_that_stops_there(tmp_path):
    # every=3 does not divide end=10: the final sparsity used to wait for step 12, which train(...,
    # step_hook=...) with 10 steps never calls; the masks also carry on after save / load
    masks = InsertMasks(sparsity=0.8, schedule=AGP(end=10, every=3))
    gm = compile_zoo("lenet300", masks)
    for step in range(1, 7):
        masks.update_masks(gm, step)
    path = tmp_path / "half.fxc"
    fxcompress.save(gm, path)
    gm = fxcompress.load(path)
    for step in range(7, 11):
        layers = masks.update_masks(gm, step)
    for name, (layer, mask) in masks_of(gm).items():
        assert mask.numel() - mask.count_nonzero() == count_to_prune(0.8, mask.numel()), name
        assert layers[name] == pytest.approx(0.8, abs=1e-6)
