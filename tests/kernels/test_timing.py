import time

import pytest
import torch

from fxcompress.errors import ConfigError
from fxcompress.kernels import KernelChoice, choose_kernel, median_ms, timing


def _sleeper(seconds):
    return lambda *args: time.sleep(seconds)


class FakeClock:
    """A clock each candidate advances by its own cost: the choice is tested without timing noise."""

    def __init__(self):
        self.now = 0.0

    def costing(self, seconds):
        def run(*args):
            self.now += seconds
        return run


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(timing.CLOCKS, "fake", lambda: clock.now)
    return clock


def test_picks_the_clearly_faster_kernel_and_reports_every_time(fake):
    choice = choose_kernel({"dense": fake.costing(0.004), "sparse": fake.costing(0.0005)}, (), baseline="dense",
                           repeats=3, warmup=1, clock="fake")
    assert choice.kernel == "sparse"
    assert choice.times_ms == pytest.approx({"dense": 4.0, "sparse": 0.5})
    assert choice.speedup_over("dense") == pytest.approx(8.0)


def test_keeps_the_baseline_unless_the_other_wins_by_the_margin(fake):
    candidates = {"dense": fake.costing(0.002), "other": fake.costing(0.0011)}
    assert choose_kernel(candidates, (), baseline="dense", margin=2.0, clock="fake").kernel == "dense"
    assert choose_kernel(candidates, (), baseline="dense", margin=1.5, clock="fake").kernel == "other"


def test_real_clocks_measure_real_work():
    choice = choose_kernel({"dense": _sleeper(0.004), "sparse": _sleeper(0.0005)}, (), baseline="dense",
                           repeats=3, warmup=1)
    assert choice.times_ms["dense"] >= 3.9  # a sleep never ends early; how late it ends depends on the load


def test_stats_round_trip_and_bad_choices_are_refused():
    choice = KernelChoice("csr", {"dense": 2.0, "csr": 0.5})
    assert KernelChoice.from_stats(choice.as_stats()) == choice
    with pytest.raises(ConfigError, match="'bsr'"):
        KernelChoice.from_stats({"kernel": "bsr", "times_ms": {"dense": 1.0}})
    with pytest.raises(ConfigError, match="baseline"):
        choose_kernel({"a": _sleeper(0)}, (), baseline="b")
    assert median_ms(_sleeper(0.001), (), repeats=3, warmup=0) >= 0.9


def test_a_reference_is_timed_but_never_chosen(fake):
    candidates = {"fp32": fake.costing(0.0001), "float": fake.costing(0.004), "c": fake.costing(0.001)}
    choice = choose_kernel(candidates, (), baseline="float", repeats=3, clock="fake", references=("fp32",))
    assert choice.kernel == "c" and choice.times_ms["fp32"] == pytest.approx(0.1)
    assert choice.speedup_over("fp32") == pytest.approx(0.1)  # the float layer it replaced was faster here
    with pytest.raises(ConfigError, match="baseline"):
        choose_kernel(candidates, (), baseline="fp32", references=("fp32",))


def test_cold_measurement_subtracts_the_eviction_from_every_candidate(fake, monkeypatch):
    monkeypatch.setattr(timing, "EVICT_BYTES", 1 << 12)
    monkeypatch.setattr(timing, "CLOCKS", {**timing.CLOCKS, "wall": lambda: fake.now})
    real_add = torch.Tensor.add_

    def costly_add(self, *args, **kwargs):  # the eviction costs 2 ms on the fake clock
        fake.now += 0.002
        return real_add(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "add_", costly_add)
    choice = timing.measure({"float": fake.costing(0.003), "c": fake.costing(0.001)}, torch.zeros(1),
                            baseline="float", repeats=3, margin=1.05, cold=True)
    assert choice.times_ms == pytest.approx({"float": 3.0, "c": 1.0}) and choice.kernel == "c"
