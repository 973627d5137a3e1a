"""One contract over every pass (as scikit-learn's common tests): frozen config, repr round trip,
plain-data config, every field declared and every bad value refused by name, and on every zoo model
either a real change or the refusal the table below expects."""
import dataclasses
import importlib
import json
import math
import os
import pkgutil
import re
from typing import ClassVar

import pytest
import torch

import fxcompress
import fxcompress.passes as passes
from fxcompress.config import (Boolean, Callables, Interval, MappingOf, Options, Regex, SubclassOf, TupleOf, TypeOf,
                               invalid_values, satisfies, validate)
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.pass_base import Pass
from fxcompress.passes import (ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToEncoded,
                               LowerToInteger, LowerToSparse, LowerWeightOnly)
from fxcompress.pruning import AGP
from fxcompress.pruning.owl import OWL
from fxcompress.zoo import ZOO

PASSES = [getattr(passes, name) for name in passes.__all__ if isinstance(getattr(passes, name), type)
          and issubclass(getattr(passes, name), Pass)]
# Configuration objects passes take as field values follow the same contract.
CONFIGS = PASSES + [ActivationConfig, AGP, OWL]
REQUIRED = {AGP: {"end": 10}}  # fields without a default


def test_every_public_pass_is_covered():
    names = {p.__name__ for p in PASSES}
    assert names == {"FoldBatchNorm", "InsertFakeQuant", "InsertMasks", "LowerDynamicInt8", "LowerToEncoded",
                     "LowerToInteger", "LowerToSparse", "LowerWeightOnly", "PruneChannels", "ScaleChannels",
                     "SparseGPT"}  # a new pass: add it here, and to EXPECTED / PREREQUISITES where it needs them


def test_every_pass_defined_in_the_passes_folder_is_public():
    """A pass class written in passes/ but left out of __all__ would escape every contract test."""
    defined = {name for info in pkgutil.iter_modules(passes.__path__)
               for name, value in vars(importlib.import_module(f"{passes.__name__}.{info.name}")).items()
               if isinstance(value, type) and issubclass(value, Pass) and value.__module__.startswith(passes.__name__)}
    assert defined == {p.__name__ for p in PASSES}


def test_the_suite_checks_every_analysis_a_pass_reports_preserved():
    """conftest turns compile's checking mode on, so every compile below recomputes what each pass
    reported preserved and fails on a difference; a run that turned it off would test less."""
    assert os.environ.get("FXCOMPRESS_CHECK_ANALYSES", "") not in ("", "0")


@pytest.mark.parametrize("pass_type", PASSES, ids=lambda p: p.__name__)
def test_config_is_frozen_plain_data_and_round_trips(pass_type):
    p = pass_type()
    assert dataclasses.is_dataclass(p)
    field = dataclasses.fields(p)[0].name if dataclasses.fields(p) else None
    if field is not None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, field, getattr(p, field))
    json.dumps(p.config())  # history and files store it as plain data
    namespace = {name: getattr(passes, name) for name in passes.__all__}
    assert eval(repr(p), namespace) == p  # noqa: S307 - repr of our own dataclasses


# ---- declared constraints ---------------------------------------------------------------------

@pytest.mark.parametrize("config_type", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_declared_constraint(config_type):
    fields = {f.name for f in dataclasses.fields(config_type)}
    assert set(config_type.constraints) == fields  # a new field without a declaration fails here


FIELDS = [(config_type, name) for config_type in CONFIGS for name in config_type.constraints]


@pytest.mark.parametrize("config_type, field", FIELDS, ids=[f"{c.__name__}.{f}" for c, f in FIELDS])
def test_every_bad_value_of_every_field_is_a_config_error_naming_it(config_type, field):
    bad_values = invalid_values(config_type.constraints[field])
    assert bad_values, f"{config_type.__name__}.{field}: its constraints generate no invalid value"
    for value in bad_values:
        with pytest.raises(ConfigError, match=rf"\b{config_type.__name__}\.{re.escape(field)}\b"):
            config_type(**{**REQUIRED.get(config_type, {}), field: value})


def test_a_field_without_a_declaration_is_refused_when_built():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Undeclared(Pass):
        flag: bool = False
        count: int = 0
        constraints: ClassVar[dict] = {"flag": (Boolean(),)}

        def __post_init__(self) -> None:
            validate(self)

    with pytest.raises(TypeError, match="Undeclared.count has no declared constraints"):
        Undeclared()


CONSTRAINTS = [Interval(int, 1, 16), Interval(int, 0), Interval(float, 0.0, 1.0, hi_open=True),
               Interval(float, 0.0, 1.0, lo_open=True), Options("a", "b"), Boolean(), Regex(), Callables(),
               SubclassOf(torch.nn.Module), TupleOf(Regex(), min_len=1), MappingOf(Regex(), Interval(int, 0), 1)]


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=repr)
def test_each_constraint_accepts_its_example_and_refuses_its_invalid_values(constraint):
    assert constraint.satisfied_by(constraint.example())
    for value in constraint.invalid_values():
        assert not constraint.satisfied_by(value), value


@pytest.mark.parametrize("value, accepted", [
    (1, True), (16, True), (0, False), (17, False), (True, False), (4.0, False), ("4", False),
])
def test_an_integer_interval_takes_only_integers_in_range(value, accepted):
    assert Interval(int, 1, 16).satisfied_by(value) is accepted


def test_constraint_messages_name_the_culprit():
    alternatives = (Regex(), None)
    assert satisfies(None, alternatives) and satisfies("fc\\d", alternatives) and not satisfies("fc(", alternatives)
    from fxcompress.config import explain
    assert explain("P.select", 3, alternatives) == "P.select must be a regular expression or None, got 3"
    assert explain("P.select", "fc(", alternatives).startswith("P.select: 'fc(' is not a valid regular expression")
    assert explain("P.bits", 40, (Interval(int, 1, 16),)) == "P.bits must be in [1, 16], got 40"
    assert explain("P.bits", 4.0, (Interval(int, 1, 16),)) == "P.bits must be an integer, got 4.0"
    assert explain("P.amount", {"fc": 2.0}, (MappingOf(Regex(), Interval(float, 0.0, 1.0)),)) == \
        "P.amount['fc'] must be in [0.0, 1.0], got 2.0"
    assert explain("P.keep", ("fc", 3), (TupleOf(Regex(), SubclassOf(torch.nn.Module)),)).startswith(
        "P.keep must be a regular expression or a subclass of Module, got 3")
    assert explain("P.schedule", 3, (TypeOf(AGP, what="an AGP(...)"), None)) == \
        "P.schedule must be an AGP(...) or None, got 3"
    assert math.isnan(Interval(float, 0.0, 1.0).invalid_values()[3])


# ---- every pass on every zoo model ------------------------------------------------------------

UNCHANGED = "unchanged"  # the pass runs and, rightly, finds nothing to do
NO_BATCHNORM = ("lenet300", "lenet5", "transformer", "gpt_block")
# (pass, zoo model) -> what the default pass, run alone, must do there instead of changing the graph.
EXPECTED = {
    **{("FoldBatchNorm", model): UNCHANGED for model in NO_BATCHNORM},
    ("FoldBatchNorm", "densenet"): UNCHANGED,  # each BatchNorm reads a concatenation, a pooling or a shared output
    # lowering needs what earlier passes put on the weight chains (see PREREQUISITES)
    **{("LowerToEncoded", model): UNCHANGED for model in ZOO},
    **{("LowerToInteger", model): PreconditionError for model in ZOO},
    **{("LowerWeightOnly", model): PreconditionError for model in ZOO},  # needs linear fake-quant weights
    **{("LowerToSparse", model): UNCHANGED for model in ZOO},
    **{("SparseGPT", model): PreconditionError for model in ZOO},  # calibrated: needs calibration_data
    **{("ScaleChannels", model): PreconditionError for model in ZOO},  # calibrated: needs calibration_data
}
# The passes a lowering pass needs before it; run after them it must change every zoo model.
PREREQUISITES = {
    LowerToEncoded: [InsertMasks(sparsity=0.9)],  # sparse: quick to encode
    LowerToInteger: [InsertFakeQuant(method="linear", activations=ActivationConfig())],
    LowerWeightOnly: [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)],
    LowerToSparse: [InsertMasks(sparsity=0.9)],
}
# The lowering pass run after them: the timed ones time each candidate kernel once (the default 7 rounds
# of medians choose better kernels, not whether the pass lowers; test_default_pass_on_every_zoo_model runs
# the defaults, and the kernel tests time with several rounds); LowerToEncoded writes fixed-width codes
# (the default tries three codings per layer, a third of the time here; the default lowers every zoo
# model exactly in test_lower_encoded.py::test_zoo_models_lower_exactly).
LOWERINGS = {LowerToEncoded: LowerToEncoded(coding="fixed"), LowerToInteger: LowerToInteger(repeats=1),
             LowerWeightOnly: LowerWeightOnly(repeats=1), LowerToSparse: LowerToSparse(repeats=1)}


def test_the_expected_outcomes_name_real_passes_and_models():
    assert {name for name, _ in EXPECTED} <= {p.__name__ for p in PASSES}
    assert {model for _, model in EXPECTED} <= set(ZOO)
    assert set(LOWERINGS) == set(PREREQUISITES) and all(type(p) is t for t, p in LOWERINGS.items())


def _changed_record(gm, pass_type, config=None):
    record = fxcompress.history(gm)[-1]
    assert record.name == pass_type.__name__ and record.config == (config or pass_type().config())
    return record


@pytest.mark.parametrize("pass_type", PASSES, ids=lambda p: p.__name__)
def test_default_pass_on_every_zoo_model(pass_type, zoo_model):
    name, model, inputs = zoo_model
    expected = EXPECTED.get((pass_type.__name__, name))
    if isinstance(expected, type):
        with pytest.raises(expected):
            fxcompress.compile(model, [pass_type()], example_inputs=inputs)
        return
    gm = fxcompress.compile(model, [pass_type()], example_inputs=inputs)
    record = _changed_record(gm, pass_type)
    if expected == UNCHANGED:
        assert not record.changed, f"{pass_type.__name__} changed {name}, listed as having nothing to do"
        return
    assert record.changed, f"{pass_type.__name__} did nothing on {name}"
    assert record.nodes_created or record.nodes_erased or record.nodes_changed or record.params_touched


@pytest.mark.parametrize("pass_type", list(PREREQUISITES), ids=lambda p: p.__name__)
def test_a_lowering_pass_after_its_prerequisites_changes_every_zoo_model(pass_type, zoo_model):
    name, model, inputs = zoo_model
    lowering = LOWERINGS[pass_type]
    gm = fxcompress.compile(model, [*PREREQUISITES[pass_type], lowering], example_inputs=inputs,
                            calibration_data=[inputs])
    record = _changed_record(gm, pass_type, lowering.config())
    assert record.changed and record.params_touched, f"{pass_type.__name__} did nothing on {name}"


def test_fold_batchnorm_reports_why_nothing_folds_on_densenet():
    make_model, make_input = ZOO["densenet"]
    gm = fxcompress.compile(make_model().eval(), [FoldBatchNorm()], example_inputs=(make_input(),))
    skipped = fxcompress.history(gm)[-1].stats["skipped"]
    assert len(skipped) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in make_model().modules())
    reasons = r"fed by cat(_\d+)?, which is not a conv|also read by cat|fed by AvgPool2d, which cannot absorb"
    assert all(re.search(reasons, reason) for reason in skipped.values()), skipped


@pytest.mark.parametrize("pass_type", [InsertMasks, InsertFakeQuant], ids=lambda p: p.__name__)
def test_a_pass_that_acts_on_layers_refuses_a_model_without_one(pass_type):
    with pytest.raises(ConfigError, match=rf"{pass_type.__name__} selects no layer"):
        fxcompress.compile(torch.nn.Sequential(torch.nn.ReLU()), [pass_type()], example_inputs=(torch.randn(2, 3),))
