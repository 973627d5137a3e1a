"""One contract over every pass (as scikit-learn's common tests): frozen config, repr round trip,
plain-data config, typed failures, a verified graph and a history record on every zoo model."""
import dataclasses
import json

import pytest
import torch

import fxcompress
import fxcompress.passes as passes
from fxcompress.errors import FxCompressError, PreconditionError
from fxcompress.pass_base import Pass

PASSES = [getattr(passes, name) for name in passes.__all__ if isinstance(getattr(passes, name), type)
          and issubclass(getattr(passes, name), Pass)]


def test_every_public_pass_is_covered():
    names = {p.__name__ for p in PASSES}
    assert {"InsertMasks", "PruneChannels", "InsertFakeQuant", "LowerToEncoded", "LowerToInteger", "FoldBatchNorm"} <= names


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


@pytest.mark.parametrize("pass_type", PASSES, ids=lambda p: p.__name__)
def test_default_pass_on_every_zoo_model(pass_type, zoo_model):
    name, model, inputs = zoo_model
    try:
        gm = fxcompress.compile(model, [pass_type()], example_inputs=inputs)
    except PreconditionError:
        return  # a documented refusal (e.g. a pass that needs calibration data) is part of the contract
    (record,) = fxcompress.history(gm)
    assert record.name == pass_type.__name__ and record.config == pass_type().config()
    with torch.no_grad():
        out = gm.eval()(*inputs)
    assert out.shape == model(*inputs).shape and bool(torch.isfinite(out).all()), name
    if not record.changed:
        assert not (record.nodes_created or record.nodes_erased or record.nodes_changed)


@pytest.mark.parametrize("pass_type", PASSES, ids=lambda p: p.__name__)
def test_a_bad_field_value_is_a_typed_error(pass_type):
    field = next((f for f in dataclasses.fields(pass_type) if f.name in
                  ("sparsity", "amount", "bits", "coding", "index_bits")), None)
    if field is None:
        assert dataclasses.fields(pass_type) == () or pass_type.__name__ == "LowerToInteger"
        return
    with pytest.raises(FxCompressError, match=rf"{pass_type.__name__}\.{field.name}"):
        pass_type(**{field.name: "not a valid value"})
