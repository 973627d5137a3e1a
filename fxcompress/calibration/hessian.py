"""Per-layer input statistics and the damped inverse Hessian the second-order updates use.

For a linear layer y = x W^T, the layer-wise reconstruction loss ||W X - W' X||^2 has the Hessian
2 X^T X over the calibration tokens (Hassibi & Stork's OBS, as SparseGPT and GPTQ use it). It is
accumulated in float64: summing millions of float32 outer products loses the small eigenvalues
that the Cholesky factorization needs. Each chunk's product is taken in float32 (float64 products
were the largest part of a GPTQ pass's time) from rows shifted by a fixed
per-channel offset, the first chunk's mean, and the offset's part is added back in float64: what
float32 rounds is then only the spread of one chunk of at most CHUNK_ELEMENTS values around that
offset, never a large common value (the case float32 sums lose).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import PreconditionError

PERCDAMP = 0.01      # damping as a fraction of the mean diagonal (GPTQ's default)
DAMP_CAP = 10.0      # the largest damping tried before giving up: beyond it the update is meaningless
DAMP_GROWTH = 10.0   # each retry multiplies the damping by this
CHUNK_ELEMENTS = 1 << 20  # rows are added in float64 chunks of at most this many values (8 MiB)


@dataclass
class InputStats:
    """Statistics of one layer input over the calibration tokens (rows of the flattened input).

    `hessian` is the mean X^T X (float64), `sq_sum` the per-channel sum of squares (Wanda's
    ||X_j||_2^2), `abs_sum` the per-channel sum of magnitudes (AWQ's mean |x|), `abs_max` the
    per-channel largest magnitude (SmoothQuant's max |x|).
    """

    channels: int
    with_hessian: bool = True
    name: str = "the layer"     # for messages: the layers reading this input
    rows: int = 0
    sq_sum: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    abs_max: torch.Tensor = field(init=False)
    hessian: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.sq_sum = torch.zeros(self.channels, dtype=torch.float64)
        self.abs_sum = torch.zeros(self.channels, dtype=torch.float64)
        self.abs_max = torch.zeros(self.channels, dtype=torch.float64)
        self.hessian = torch.zeros(self.channels, self.channels, dtype=torch.float64) if self.with_hessian else None
        self._shift: torch.Tensor | None = None   # float64 per-channel offset of the float32 products

    def update(self, x: torch.Tensor, batch: int = 0) -> None:
        """Add a batch; the last dimension of `x` is the input channels."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0 or x.shape[-1] != self.channels:
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise PreconditionError(f"calibration batch {batch}: the input of {self.name} is {got}; it takes "
                                    f"floating-point values with {self.channels} channels last")
        flat = x.detach().reshape(-1, x.shape[-1])
        step = max(1, CHUNK_ELEMENTS // self.channels)
        for start in range(0, flat.shape[0], step):  # float64 copies of a chunk, never of the whole batch
            self._add(flat[start:start + step].to(torch.float64))

    def _add(self, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        self.sq_sum += rows.pow(2).sum(0)
        magnitude = rows.abs()
        self.abs_sum += magnitude.sum(0)
        self.abs_max = torch.maximum(self.abs_max, magnitude.amax(0))
        if self.hessian is not None:
            # running mean: the scale stays that of one token however many batches come
            self.hessian.mul_(self.rows / (self.rows + n)).add_(self._outer_sum(rows), alpha=1.0 / (self.rows + n))
        self.rows += n

    def _outer_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """X^T X of a float64 chunk: (X - m)^T (X - m) in float32, plus m t^T + t m^T + n m m^T in float64,
        where t is the chunk's sum of X - m (the expansion of X = (X - m) + m)."""
        if self._shift is None:
            self._shift = rows.mean(0)
        centered = rows - self._shift
        spread = centered.to(torch.float32)
        product = (spread.T @ spread).to(torch.float64)
        if not bool(torch.isfinite(product).all()):
            # finite inputs beyond ~1e19 overflow float32 products: take this chunk in float64 (a NaN / Inf
            # input stays non-finite there and is refused by `check`)
            product = centered.T @ centered
        total = centered.sum(0)
        product.addr_(self._shift, total).addr_(total, self._shift).addr_(self._shift, self._shift, alpha=rows.shape[0])
        return product

    def check(self, owner: str, layers: Sequence[str]) -> None:
        """Refuse statistics no weight should be chosen from, once every batch is in (one look per group, not
        per batch): no token at all (a pruner would find every input dead and zero the weights) or NaN / Inf
        inputs (NaN norms sort anywhere, so Wanda's top-k would keep or drop channels at random), or inputs
        that are zero in every channel (every weight would be dropped, or chosen at random).
        `layers`: the names of the layers reading this input, for the message."""
        named = ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(repr, layers))
        if self.rows == 0:
            raise PreconditionError(f"{owner}: no calibration token reaches the input of {named} (every batch "
                                    f"gives it 0 rows): there are no statistics to compress from")
        # a NaN or Inf input value makes its channel's sum of squares (and max |x|) NaN or Inf
        bad = ~(torch.isfinite(self.sq_sum) & torch.isfinite(self.abs_max))
        if bool(bad.any()):
            channels = bad.nonzero().flatten().tolist()
            shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
            raise PreconditionError(f"{owner}: the input of {named} holds NaN / Inf in {len(channels)} of "
                                    f"{self.channels} channels ({shown}); the calibration data reach them "
                                    f"as non-finite values")
        if not bool(self.abs_max.any()):
            # every channel dead: GPTQ / SparseGPT zero a dead channel's weights (H[i, i] = 1, W[:, i] = 0), so the
            # whole layer would become zero, and Wanda's scores would all tie and prune at random
            raise PreconditionError(f"{owner}: the input of {named} is zero in every channel on all {self.rows} "
                                    f"calibration tokens: there are no statistics to compress from")

    @property
    def norms(self) -> torch.Tensor:
        """Per-channel L2 norm over all calibration tokens (float32)."""
        return self.sq_sum.sqrt().float()

    def nbytes(self) -> int:
        held = (self.sq_sum, self.abs_sum, self.abs_max, self.hessian, self._shift)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


@dataclass(frozen=True)
class DampedInverse:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and how it was obtained."""

    factor: torch.Tensor   # upper triangular, float64
    damp: float            # the damping that succeeded (a fraction of the mean diagonal)
    retries: int           # how many factorizations failed before it
    dead: torch.Tensor     # input channels that never saw a nonzero value (their weights carry no signal)

    def report(self) -> dict[str, float | int]:
        return {"damp": self.damp, "retries": self.retries, "dead_inputs": int(self.dead.sum())}


def damped_inverse(hessian: torch.Tensor, layer: str, percdamp: float = PERCDAMP,
                   cap: float = DAMP_CAP) -> DampedInverse:
    """Cholesky of the inverse of the damped Hessian, raising the damping x10 while a factorization fails.

    A Hessian from few tokens, or from inputs with exactly collinear channels, is singular; float
    error then makes it indefinite and Cholesky fails (GPTQ's "not positive-definite"). More damping
    always succeeds eventually, at the price of a weaker update; beyond `cap` a PreconditionError
    names the layer rather than returning an update that would not be second-order at all.
    """
    h = hessian.to(torch.float64).clone()
    if not bool(torch.isfinite(h).all()):  # Cholesky reads one triangle: a NaN in the other would pass unseen
        raise PreconditionError(f"layer {layer!r}: the input Hessian holds NaN / Inf; the calibration data reach "
                                f"this layer as non-finite values")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    damp, retries = percdamp, 0
    while damp <= cap * (1 + 1e-9):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return DampedInverse(upper, damp, retries, dead)
        damp, retries = damp * DAMP_GROWTH, retries + 1
    raise PreconditionError(f"layer {layer!r}: the input Hessian ({h.shape[0]} channels) stays not positive-definite "
                            f"with damping up to {cap:g} x its mean diagonal; the calibration inputs of this layer "
                            f"are degenerate (NaN, or far too few tokens)")
