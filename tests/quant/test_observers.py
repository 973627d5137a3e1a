import pytest
import torch

from fxcompress.errors import ConfigError
from fxcompress.quant.observers import (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver,
                                        all_reduce, distributed, make_observer)


def batches(n=5, size=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("kind", ["minmax", "moving_average", "percentile"])
def test_nothing_observed_means_no_range(kind):
    assert make_observer(kind).range() is None


def test_min_max_is_the_extremes_of_everything_seen():
    observer = MinMaxObserver()
    data = batches()
    for x in data:
        observer.update(x)
    everything = torch.cat(data)
    assert observer.range() == (float(everything.min()), float(everything.max()))


def test_moving_average_moves_by_momentum():
    observer = MovingAverageMinMaxObserver(momentum=0.25)
    observer.update(torch.tensor([-1.0, 2.0]))
    assert observer.range() == (-1.0, 2.0)
    observer.update(torch.tensor([-5.0, 10.0]))
    assert observer.range() == pytest.approx((-1.0 + 0.25 * (-4.0), 2.0 + 0.25 * 8.0))


def test_percentile_cuts_outliers_that_min_max_keeps():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    x[:5] = torch.tensor([80.0, -60.0, 75.0, 90.0, -70.0])
    observer = PercentileObserver(percentile=99.9, bins=4096)
    for part in x.split(10_000):
        observer.update(part)
    low, high = observer.range()
    true_low, true_high = torch.quantile(x, 0.001).item(), torch.quantile(x, 0.999).item()
    width = 2 * float(observer.limit) / observer.bins
    assert abs(low - true_low) <= 2 * width and abs(high - true_high) <= 2 * width
    assert high < 5 and low > -5  # min-max would stretch to [-70, 90]


def test_percentile_histogram_keeps_every_count_when_its_range_doubles():
    observer = PercentileObserver(percentile=100.0, bins=64)
    observer.update(torch.linspace(-1, 1, 100))
    observer.update(torch.linspace(-7, 7, 50))  # doubles the range three times
    assert float(observer.limit) >= 7
    assert float(observer.histogram.sum()) == 150
    assert observer.range() == (-7.0, 7.0)  # at 100 % the range is the true min-max


def test_percentile_observer_bins_are_a_multiple_of_four():
    assert PercentileObserver(bins=10).bins == 12


@pytest.mark.parametrize("make", [lambda: MovingAverageMinMaxObserver(momentum=0.0),
                                  lambda: MovingAverageMinMaxObserver(momentum=1.5),
                                  lambda: PercentileObserver(percentile=10.0),
                                  lambda: PercentileObserver(bins=1)])
def test_bad_options_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_statistics_stay_local_without_a_process_group():
    # the reduction across ranks is tests/test_distributed.py's; alone, a batch's statistics are its own
    assert not distributed()
    counts = torch.tensor([1.0, 2.0])
    assert all_reduce(counts, "SUM") is counts and counts.tolist() == [1.0, 2.0]
