"""Observers leave padded positions out while `keep` is set (calibrate sets it from the attention mask): values at
padded positions never reach the range, whatever the activation's layout lines up with; a layout that does not
line up is observed whole and flagged; a batch of padding only changes nothing."""
import pytest
import torch

from fxcompress.errors import PreconditionError
from fxcompress.quant.observers import make_observer

KINDS = ["minmax", "moving_average", "percentile"]


def _keep() -> torch.Tensor:
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False   # three padded positions in row 0
    return keep


def _padded_activation(shape_after: tuple[int, ...] = (4,)) -> torch.Tensor:
    """Values in [-1, 1] at kept positions, +-1000 at padded ones: any padded value read shows in the range."""
    x = torch.linspace(-1, 1, 2 * 5 * max(1, torch.Size(shape_after).numel())).reshape(2, 5, *shape_after)
    x[0, 3] = 1000.0
    x[0, 4] = -1000.0
    return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["batch, sequence, channels", "batch, sequence", "batch, sequence, heads, dim",
                                    "batch * sequence, channels"])
def test_padded_positions_are_left_out_of_the_range(kind, layout):
    shaped = {"batch, sequence, channels": lambda: _padded_activation((4,)),
              "batch, sequence": lambda: _padded_activation(()),
              "batch, sequence, heads, dim": lambda: _padded_activation((2, 3)),
              "batch * sequence, channels": lambda: _padded_activation((4,)).reshape(10, 4)}
    x = shaped[layout]()
    observer = make_observer(kind)
    observer.keep = _keep()
    observer.update(x)
    low, high = observer.range()
    assert -1.0 <= low < 0 < high <= 1.0 and observer.padding_included is False
    reference = make_observer(kind)   # the kept values alone give the same state
    reference.update(x.reshape(2, 5, -1)[_keep()])
    for name, value in reference.state_dict().items():
        assert torch.equal(observer.state_dict()[name], value), name


@pytest.mark.parametrize("kind", KINDS)
def test_a_layout_that_does_not_line_up_is_observed_whole_and_flagged(kind):
    observer = make_observer(kind)
    observer.keep = _keep()
    observer.update(_padded_activation().transpose(0, 1))   # (sequence, batch, channels)
    assert observer.padding_included is True
    assert float(observer.low) == -1000.0 and float(observer.high) == 1000.0   # the padded extremes were read


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_of_padding_only_changes_nothing(kind):
    observer = make_observer(kind)
    observer.update(torch.linspace(-2, 3, 40))
    before = {k: v.clone() for k, v in observer.state_dict().items()}
    observer.keep = torch.zeros(2, 5, dtype=torch.bool)
    observer.update(_padded_activation())
    assert all(torch.equal(observer.state_dict()[k], v) for k, v in before.items())
    fresh = make_observer(kind)
    fresh.keep = torch.zeros(2, 5, dtype=torch.bool)
    fresh.update(_padded_activation())
    assert fresh.range() is None


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_values_at_kept_positions_are_still_refused(kind):
    x = _padded_activation()
    x[1, 0, 0] = float("inf")
    observer = make_observer(kind)
    observer.keep = _keep()
    with pytest.raises(PreconditionError, match="NaN or Inf"):
        observer.update(x)
    x[1, 0, 0] = 0.0
    x[0, 4, 0] = float("nan")   # at a padded position: never read
    observer.update(x)
    assert observer.range() is not None
