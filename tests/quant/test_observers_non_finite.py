"""A batch holding NaN or Inf is refused by every observer, in calibration and in training alike."""
import pytest
import torch
from test_distributed import run_ranks  # two forked gloo ranks

from fxcompress.errors import PreconditionError
from fxcompress.quant import ActivationQuant
from fxcompress.quant.observers import OBSERVERS, make_observer


def poisoned(value, size=64):
    x = torch.randn(size, generator=torch.Generator().manual_seed(0))
    x[7] = value
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", OBSERVERS)
def test_a_non_finite_batch_is_refused_and_leaves_the_observer_as_it_was(kind, value):
    observer = make_observer(kind)
    with pytest.raises(PreconditionError, match="NaN or Inf"):
        observer.update(poisoned(value))
    assert observer.range() is None  # a refused first batch sets nothing
    observer.update(torch.tensor([-1.0, 2.0]))
    before = observer.range()
    with pytest.raises(PreconditionError, match="NaN or Inf") as caught:
        observer.update(poisoned(value))
    assert caught.value.observer is observer  # how calibrate finds the quantizer to name
    assert observer.range() == before


@pytest.mark.parametrize("kind", OBSERVERS)
def test_training_through_the_observer_refuses_a_nan_batch_and_keeps_the_grid(kind):
    quant = ActivationQuant(bits=8, observer=kind).train()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    quant(x)
    before = quant.observer.range()
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(PreconditionError, match="NaN or Inf"):
        quant(bad)
    assert quant.observer.range() == before
    assert torch.isfinite(quant(x)).all()  # the next clean batch quantizes on a finite grid


def _observe_on_rank(rank, kind):
    """Rank 1's batch holds NaN, rank 0's is clean: whether this rank's observer refused it."""
    observer = make_observer(kind)
    x = poisoned(float("nan")) if rank == 1 else torch.randn(64)
    try:
        observer.update(x)
    except PreconditionError:
        return True
    return False


@pytest.mark.parametrize("kind", OBSERVERS)
def test_ranks_refuse_together_when_one_rank_holds_a_nan(tmp_path, kind):
    # NaN is unordered under the MAX reduction: without care the clean rank would accept, and its
    # next collective would wait forever on the rank that refused
    assert run_ranks(tmp_path, _observe_on_rank, kind) == [True, True]
