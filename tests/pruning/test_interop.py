"""torch.nn.utils.prune interop both ways, and lottery-ticket rewinding."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.passes import InsertMasks
from fxcompress.pruning import get_mask, masked_layers
from fxcompress.pruning.interop import export_to_torch_prune, import_from_torch_prune, rewind
from fxcompress.zoo import LeNet5

X = torch.randn(3, 1, 28, 28)


def masked_lenet5(sparsity=0.6):
    model = LeNet5()
    return model, fxcompress.compile(model, [InsertMasks(sparsity=sparsity, scope="global")], example_inputs=(X,))


@pytest.fixture(scope="module")
def masked():
    """(LeNet-5, its global 60% masked compile), built once from seed 0 as each test built it before; the tests
    read it, and the one that calls rewind (which changes the model it is given) works on a copy."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return masked_lenet5()


def masks(gm):
    return {layer.weight: get_mask(gm, layer) for layer in masked_layers(gm)}


def test_round_trip_through_torch_prune_keeps_masks_weights_and_outputs(masked):
    _, gm = masked
    exported = export_to_torch_prune(gm, LeNet5())
    assert {"fc1.weight_orig", "fc1.weight_mask", "conv1.weight_orig"} <= set(exported.state_dict())
    assert prune.is_pruned(exported)
    assert torch.allclose(exported(X), gm(X), atol=1e-6)
    back = import_from_torch_prune(exported, (X,))
    assert prune.is_pruned(exported), "import must not change the model it reads"
    assert masks(back).keys() == masks(gm).keys()
    for name, mask in masks(gm).items():
        assert torch.equal(masks(back)[name], mask)
    assert torch.allclose(back(X), gm(X), atol=1e-6)
    assert fxcompress.history(back)[-1].name == "import_from_torch_prune"


def test_import_a_model_pruned_by_torch_then_advance_it_with_insert_masks():
    model = LeNet5()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    prune.random_unstructured(model.conv2, "weight", amount=0.3)
    gm = import_from_torch_prune(model, (X,))
    assert torch.equal(masks(gm)["fc1.weight"], model.fc1.weight_mask)
    more = fxcompress.compile(gm, [InsertMasks(sparsity=0.8, select="fc1")], example_inputs=(X,))
    assert not masks(more)["fc1.weight"][model.fc1.weight_mask == 0].any()
    assert (masks(more)["fc1.weight"] == 0).float().mean().item() == pytest.approx(0.8, abs=1e-6)


def test_import_refuses_masks_it_cannot_place():
    model = LeNet5()
    prune.l1_unstructured(model.fc1, "bias", amount=0.5)
    with pytest.raises(PreconditionError, match="masks on \\['fc1.bias'\\]"):
        import_from_torch_prune(model, (X,))


def test_export_needs_a_matching_unpruned_model(masked):
    _, gm = masked
    with pytest.raises(ConfigError, match="does not match"):
        export_to_torch_prune(gm, LeNet5(image_size=32))


def test_rewind_resets_survivors_to_their_initial_values_and_keeps_zeros():
    torch.manual_seed(3)
    model = LeNet5()
    initial = copy.deepcopy(model.state_dict())
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(X,))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)  # "training"
    rewind(gm, initial)
    for name, mask in masks(gm).items():
        weight = gm.get_parameter(name)
        assert torch.equal(weight, initial[name] * mask)
    assert torch.equal(gm.fc1.bias, initial["fc1.bias"])


def test_rewind_checks_the_state_it_is_given(masked):
    model, gm = masked[0], copy.deepcopy(masked[1])
    state = model.state_dict()
    with pytest.raises(ConfigError, match="no entry for 'fc2.bias'"):
        rewind(gm, {k: v for k, v in state.items() if k != "fc2.bias"})
    with pytest.raises(ConfigError, match="initial_state\\['fc2.bias'\\] has shape"):
        rewind(gm, dict(state, **{"fc2.bias": torch.zeros(3)}))


def test_exported_model_trains_with_torch_prune_semantics(masked):
    _, gm = masked
    exported = export_to_torch_prune(gm, LeNet5())
    nn.functional.cross_entropy(exported(X), torch.zeros(3, dtype=torch.long)).backward()
    assert not exported.fc1.weight_orig.grad[exported.fc1.weight_mask == 0].any()


def test_a_tied_head_exports_and_imports_with_its_one_mask():
    # the GraphModule stores a tied tensor once: export used to fail to load its state ("Missing key(s):
    # lm_head.weight", reported as another architecture), and import raised a bare AttributeError
    from layer_cases import TiedHead

    torch.manual_seed(0)
    x = torch.tensor([[1, 2, 3, 15]])
    gm = fxcompress.compile(TiedHead(), [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    model = export_to_torch_prune(gm, TiedHead())
    mask = get_mask(gm, next(layer for layer in masked_layers(gm) if layer.name == "embed"))
    for module in (model.embed, model.lm_head):  # both readers compute with the masked tensor
        assert torch.equal(module.weight_mask.bool(), mask) and torch.equal(module.weight == 0, ~mask | (module.weight_orig == 0))
    assert torch.equal(model(x), gm(x))
    back = import_from_torch_prune(model, (x,))
    assert torch.equal(back(x), gm(x))
    assert torch.equal(get_mask(back, next(layer for layer in masked_layers(back) if layer.name == "embed")), mask)


def test_a_tied_head_pruned_apart_by_torch_is_refused():
    from layer_cases import TiedHead

    model, x = TiedHead(), torch.tensor([[1, 2, 3]])
    prune.random_unstructured(model.lm_head, "weight", amount=0.5)
    with pytest.raises(PreconditionError, match="lm_head.weight is tied to embed.weight"):
        import_from_torch_prune(model, (x,))
