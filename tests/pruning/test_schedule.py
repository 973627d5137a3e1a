"""The AGP schedule: Zhu & Gupta's cubic, monotone, held between updates."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxcompress.pruning import AGP


def test_follows_the_cubic_formula():
    agp = AGP(begin=10, end=110, initial=0.1)
    for step in (10, 35, 60, 85, 110):
        t = (step - 10) / 100
        assert agp.sparsity(0.9, step) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - t) ** 3)
    assert agp.sparsity(0.9, 0) == pytest.approx(0.1) and agp.sparsity(0.9, 10_000) == pytest.approx(0.9)


@given(begin=st.integers(0, 50), length=st.integers(1, 200), every=st.integers(1, 30),
       final=st.floats(0.0, 1.0), initial=st.floats(0.0, 1.0))
def test_monotone_and_bounded(begin, length, every, final, initial):
    agp = AGP(begin=begin, end=begin + length, every=every, initial=initial)
    values = [agp.sparsity(final, step) for step in range(begin + length + 2 * every)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(final)
    assert min(initial, final) - 1e-12 <= min(values)


def test_updates_only_every_n_steps_until_the_end():
    agp = AGP(begin=4, end=14, every=5)
    assert [s for s in range(30) if agp.updates_at(s)] == [4, 9, 14]
    assert agp.sparsity(0.8, 8) == agp.sparsity(0.8, 4)


@pytest.mark.parametrize("begin, end, every", [(0, 10, 3), (2, 10, 3), (0, 2000, 300), (5, 6, 4)])
def test_the_final_sparsity_holds_at_end_when_every_does_not_divide_the_span(begin, end, every):
    # the last update used to be the first multiple of `every` past `end`: a loop that stops at
    # `end` (train(..., step_hook=...) calls steps 1..end) never reached the final sparsity
    agp = AGP(begin=begin, end=end, every=every, initial=0.1)
    assert agp.updates_at(end)
    assert agp.sparsity(0.9, end) == 0.9
    updates = [s for s in range(begin, end) if (s - begin) % every == 0]
    assert [s for s in range(end + 2 * every) if agp.updates_at(s)] == updates + [end] + \
        [s for s in range(end + 1, end + 2 * every) if (s - begin) % every == 0][:1]
    for step in range(begin, end):  # between updates the last update's value holds
        last = begin + (step - begin) // every * every
        assert agp.sparsity(0.9, step) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (last - begin) / (end - begin)) ** 3)
