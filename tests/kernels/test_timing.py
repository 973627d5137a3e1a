import time

import pytest

from fxcompress.errors import ConfigError
from fxcompress.kernels import KernelChoice, choose_kernel, median_ms


def _sleeper(seconds):
    return lambda *args: time.sleep(seconds)


def test_picks_the_clearly_faster_kernel_and_reports_every_time():
    choice = choose_kernel({"dense": _sleeper(0.004), "sparse": _sleeper(0.0005)}, (), baseline="dense",
                           repeats=3, warmup=1)
    assert choice.kernel == "sparse"
    assert choice.times_ms["dense"] > 3.5 and choice.times_ms["sparse"] < 2.5
    assert choice.speedup_over("dense") > 1.5


def test_keeps_the_baseline_unless_the_other_wins_by_the_margin():
    choice = choose_kernel({"dense": _sleeper(0.002), "other": _sleeper(0.0019)}, (), baseline="dense",
                           repeats=3, warmup=0, margin=2.0)
    assert choice.kernel == "dense"


def test_stats_round_trip_and_bad_choices_are_refused():
    choice = KernelChoice("csr", {"dense": 2.0, "csr": 0.5})
    assert KernelChoice.from_stats(choice.as_stats()) == choice
    with pytest.raises(ConfigError, match="'bsr'"):
        KernelChoice.from_stats({"kernel": "bsr", "times_ms": {"dense": 1.0}})
    with pytest.raises(ConfigError, match="baseline"):
        choose_kernel({"a": _sleeper(0)}, (), baseline="b")
    assert median_ms(_sleeper(0.001), (), repeats=3, warmup=0) >= 0.9
