"""Input statistics in float64 (float32 products of shifted rows) and the damped inverse Hessian: exact factors, adaptive damping
with the retries reported, and a typed error naming the layer when no damping helps."""
import pytest
import torch

from fxcompress.calibration import InputStats, damped_inverse
from fxcompress.errors import PreconditionError


def _spd(n: int, eigenvalues: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def test_statistics_are_float64_running_means_of_every_batch():
    batches = [torch.randn(3, 7, 16) * (1 + i) for i in range(5)]  # (batch, tokens, channels)
    stats = InputStats(16)
    for x in batches:
        stats.update(x)
    rows = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    assert stats.rows == 105 and stats.hessian.dtype == torch.float64
    # the products are float32: a float32 rounding of the exact mean X^T X
    torch.testing.assert_close(stats.hessian, rows.T @ rows / 105, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.norms, rows.norm(dim=0).float())
    torch.testing.assert_close(stats.abs_max, rows.abs().amax(0))


def test_a_large_common_offset_keeps_the_spread_that_float32_sums_lose():
    # channels at 1000 with a spread of 1e-2: X^T X is the offset's 1e6 plus a spread 1e10 times smaller
    torch.manual_seed(0)
    batches = [1000.0 + torch.randn(4096, 4) * torch.tensor([1e-2, 2e-2, 5e-3, 1e-2]) for _ in range(16)]
    stats = InputStats(4)
    for x in batches:
        stats.update(x)
    rows = torch.cat(batches).double()
    mean = rows.mean(0)
    spread = (rows - mean).T @ (rows - mean) / rows.shape[0]  # the covariance, from centred float64 rows

    def spread_error(hessian: torch.Tensor) -> float:
        return float((hessian - torch.outer(mean, mean) - spread).abs().max() / spread.abs().max())

    assert spread_error(stats.hessian) < 1e-5
    # what the shift is for: float32 products of the rows themselves lose the spread entirely
    plain = sum((x.T @ x).double() for x in batches) / rows.shape[0]
    assert spread_error(plain) > 1.0
    # and plain float64 products keep it only to about 1e-4 (measured 2.5e-4)
    assert spread_error(stats.hessian) < spread_error(rows.T @ rows / rows.shape[0]) / 10


def test_the_factor_is_the_upper_cholesky_of_the_damped_inverse():
    h = _spd(12, torch.linspace(0.1, 4.0, 12, dtype=torch.float64))
    result = damped_inverse(h, "fc")
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(result.factor.T @ result.factor, torch.linalg.inv(damped), rtol=1e-9, atol=1e-9)
    assert torch.equal(result.factor, result.factor.triu())
    assert result.report() == {"damp": 0.01, "retries": 0, "dead_inputs": 0}


def test_an_indefinite_hessian_is_retried_with_ten_times_the_damping():
    eigenvalues = torch.ones(10, dtype=torch.float64)
    eigenvalues[-1] = -0.05  # float error in a singular X^T X can leave an eigenvalue like this
    h = _spd(10, eigenvalues)
    result = damped_inverse(h, "fc")
    assert result.damp == pytest.approx(0.1) and result.retries == 1  # 0.01 x mean diagonal is not enough
    damped = h + 0.1 * torch.diag(h).mean() * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(result.factor.T @ result.factor, torch.linalg.inv(damped), rtol=1e-8, atol=1e-8)


def test_a_hessian_no_damping_repairs_is_an_error_naming_the_layer():
    h = torch.eye(4, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 30.0  # an eigenvalue of -29 with a mean diagonal of 1: beyond the damping cap
    with pytest.raises(PreconditionError, match="layer 'model.layers.0.mlp.up_proj'.*not positive-definite"):
        damped_inverse(h, "model.layers.0.mlp.up_proj")


def test_a_non_finite_hessian_is_an_error_even_where_cholesky_would_not_look():
    h = torch.eye(6, dtype=torch.float64)
    h[2, 3] = float("nan")  # upper triangle: a lower Cholesky factorization never reads it
    with pytest.raises(PreconditionError, match="layer 'fc2'.*NaN"):
        damped_inverse(h, "fc2")


def test_inputs_that_never_fire_are_reported_dead_and_the_factor_stays_finite():
    x = torch.randn(64, 8, dtype=torch.float64)
    x[:, 5] = 0.0
    result = damped_inverse(x.T @ x / 64, "fc")
    assert result.report()["dead_inputs"] == 1 and bool(result.dead[5])
    assert bool(torch.isfinite(result.factor).all())
