"""Property tests over every pass on seeded random models (tests/randmodels.py).

Each test draws seeds with hypothesis; the "ci" profile runs a bounded share of its examples, the
"long" profile (FXCOMPRESS_LONG=1) many more. Outcomes are counted per pass and per property and
printed at the end of the module (`pytest -s`); benchmarks/random_models.py prints the same table
for any number of graphs.
"""
import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import randmodels
import fxcompress.passes
from fxcompress.pass_base import Pass
from randmodels import (PROPERTIES, check_encoded_round_trip, check_fold_batchnorm, check_lower_integer,
                        check_measured_lowerings, check_native_integer, check_pass, check_zeroed_pruning, classify, outcome,
                        pass_pipelines, random_model)

CHEAP_PASSES = ("InsertMasks", "InsertFakeQuant(linear)", "InsertFakeQuant(kmeans)", "PruneChannels",
                "PruneChannels(heads, normalized)", "FoldBatchNorm")
# passes that time kernels or read calibration data: a second, smaller share of the graphs
MEASURED_AND_CALIBRATED = ("LowerToSparse", "LowerWeightOnly", "LowerDynamicInt8", "ScaleChannels", "SparseGPT")
SEEDS = st.integers(0, 2 ** 31 - 1)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def examples(share: int, ci_graphs: int | None = None) -> settings:
    """A 1/share part of the active profile's examples (the expensive checks run fewer graphs), at
    most `ci_graphs` in the "ci" profile (every property still meets five graphs or more, each
    compiled several times); the long profile keeps its whole share."""
    count = max(1, settings().max_examples // share)
    if ci_graphs is not None and settings.get_current_profile_name() == "ci":
        count = min(count, ci_graphs)
    return settings(max_examples=count)


def record(label: str, check, *args) -> str:
    """Run a check, count its outcome, and fail on anything but a result or a typed refusal."""
    try:
        result = check(*args)
    except AssertionError:
        OUTCOMES[label]["PROPERTY VIOLATED"] += 1
        raise
    except Exception as error:
        result = classify(error)
        OUTCOMES[label][result] += 1
        if not result.startswith("refused"):
            raise
        return result
    OUTCOMES[label][result] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def _print_outcomes():
    yield
    print(f"\nrandom models: outcomes per pass and property (profile of {settings().max_examples} examples, "
          "each test a share of them)")
    for label, counts in sorted(OUTCOMES.items()):
        outcomes = ", ".join(f"{result}: {n}" for result, n in sorted(counts.items()))
        print(f"  {label:34s} {sum(counts.values()):5d} graphs  {outcomes}")


@examples(4)
@given(seed=SEEDS)
def test_the_generator_is_deterministic_and_its_models_run(seed):
    model, inputs = random_model(seed)
    again, same_inputs = random_model(seed)
    assert all(torch.equal(a, b) for a, b in zip(inputs, same_inputs))
    assert model.steps == again.steps
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    assert out.dim() == 2 and out.shape[0] == randmodels.BATCH and bool(torch.isfinite(out).all())


@examples(4, ci_graphs=6)
@given(seed=SEEDS)
def test_every_pass_verifies_or_refuses_with_a_typed_error(seed):
    """LowerToEncoded and LowerToInteger are run (and classified the same way) by their property tests."""
    model, inputs = random_model(seed)
    for name in CHEAP_PASSES:
        record(name, check_pass, name, model, inputs, seed)


@examples(8)
@given(seed=SEEDS)
def test_every_measured_or_calibrated_pass_verifies_or_refuses_with_a_typed_error(seed):
    model, inputs = random_model(seed)
    for name in MEASURED_AND_CALIBRATED:
        record(name, check_pass, name, model, inputs, seed)


def test_every_public_pass_runs_on_the_random_models():
    """A pass added to fxcompress.passes without a place here would never meet a random graph."""
    public = {name for name in fxcompress.passes.__all__
              if isinstance(getattr(fxcompress.passes, name), type) and issubclass(getattr(fxcompress.passes, name), Pass)}
    tested = {type(p).__name__ for _, p in pass_pipelines().values()}
    assert tested == public
    assert set(pass_pipelines()) == {*CHEAP_PASSES, *MEASURED_AND_CALIBRATED, "LowerToEncoded", "LowerToInteger"}


@examples(8)
@given(seed=SEEDS)
def test_measured_lowerings_compute_what_they_lower(seed):
    model, inputs = random_model(seed)
    record("measured lowerings match their model", check_measured_lowerings, model, inputs, seed)


@examples(3, ci_graphs=8)
@given(seed=SEEDS)
def test_pruning_zeroed_channels_leaves_outputs_equal(seed):
    model, inputs = random_model(seed)
    record("zeroed pruning is exact", check_zeroed_pruning, model, inputs, seed)


@examples(4, ci_graphs=6)
@given(seed=SEEDS)
def test_lowered_model_saves_and_loads_bit_identically(seed):
    model, inputs = random_model(seed)
    record("LowerToEncoded, save/load identical", check_encoded_round_trip, model, inputs, seed)


@examples(2, ci_graphs=8)
@given(seed=SEEDS)
def test_fold_batchnorm_agrees_with_the_unfolded_model(seed):
    model, inputs = random_model(seed)
    record("FoldBatchNorm allclose", check_fold_batchnorm, model, inputs, seed)


@examples(4, ci_graphs=6)
@given(seed=SEEDS)
def test_lower_integer_agrees_with_its_fake_quant_reference(seed):
    model, inputs = random_model(seed)
    record("LowerToInteger vs reference", check_lower_integer, model, inputs, seed)


@examples(4, ci_graphs=8)
@given(seed=SEEDS)
def test_native_integer_agrees_with_its_fake_quant_model(seed):
    model, inputs = random_model(seed, residual_blocks=True)
    record("LowerToInteger native vs fake quant", check_native_integer, model, inputs, seed)


def test_native_integer_on_a_convolution_adding_its_own_input():
    # seed 2051 with residual blocks: conv1(x) + x with x the model's input codes; summed in place, oneDNN
    # overwrote the codes it was still reading (the output 1.6 times the tolerance off)
    model, inputs = random_model(2051, residual_blocks=True)
    assert check_native_integer(model, inputs, 2051) == "verified, 1 adds fused"


def test_every_property_has_a_test():
    assert set(PROPERTIES.values()) == {check_zeroed_pruning, check_encoded_round_trip, check_fold_batchnorm,
                                        check_lower_integer, check_native_integer, check_measured_lowerings}


def test_lower_integer_on_a_model_with_a_dead_branch():
    # a quantized layer computed but never read: dead-code elimination removes it during lowering
    model, inputs = random_model(22)  # seed 22 leaves a quantized linear (fc4) computed but unread
    assert outcome(check_lower_integer, model, inputs, 22) == "verified"


def test_lower_weight_only_on_a_one_feature_linear_over_a_permuted_input():
    # seed 36: Linear(1, n) on x.permute(0, 2, 3, 1); its rows are "contiguous" with a last-dimension
    # stride torch's int8pack kernel refused, which crashed the kernel timing
    model, inputs = random_model(36)
    assert any(isinstance(m, torch.nn.Linear) and m.in_features == 1 for m in model.modules())
    assert outcome(check_pass, "LowerWeightOnly", model, inputs, 36) == "verified"
    # called directly: a broken property fails with its own message (which lowering, what error)
    assert check_measured_lowerings(model, inputs, 36).startswith("verified")
