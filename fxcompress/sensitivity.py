"""Pruning sensitivity: prune one layer at a time at each sparsity and measure the model (as Distiller does).

    table = fxcompress.sensitivity(model, lambda m: evaluate(m, x, y), sparsities=[0.5, 0.7, 0.9])
    print(table.to_markdown()); table.save_plot("sensitivity.png")
    per_layer = table.max_sparsity(tolerance=0.005)   # the most each layer tolerates on its own

Layers are pruned in place and restored after each evaluation, so the sweep needs no copy of the
model. A layer that already carries a mask is pruned further from it (its pruned weights stay pruned).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import check_choice, check_real
from .errors import ConfigError, MissingDependencyError
from .layers import kind_of_type
from .pruning.importance import GRANULARITIES, Importance, count_to_prune, group_dims, keep_highest, masked_scores

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SensitivityTable:
    """`values[i][j]` is the metric with layer `layers[i]` alone pruned to `sparsities[j]`."""

    layers: tuple[str, ...]
    sparsities: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]
    baseline: float
    granularity: str

    def rows(self) -> list[dict]:
        """Plain rows for programs: one dict per (layer, sparsity)."""
        return [{"layer": layer, "sparsity": s, "metric": v, "delta": v - self.baseline}
                for layer, row in zip(self.layers, self.values) for s, v in zip(self.sparsities, row)]

    def max_sparsity(self, tolerance: float) -> dict[str, float]:
        """For each layer, the highest sparsity tested before the metric first drops by more than `tolerance`."""
        return {layer: self._tolerated(row, tolerance) for layer, row in zip(self.layers, self.values)}

    def _tolerated(self, row: Sequence[float], tolerance: float) -> float:
        best = 0.0
        for s, v in sorted(zip(self.sparsities, row)):
            if v < self.baseline - tolerance:
                break
            best = s
        return best

    def _grid(self) -> list[list[str]]:
        header = ["layer", *(f"{s:g}" for s in self.sparsities)]
        body = [[layer, *(f"{v:.4f}" for v in row)] for layer, row in zip(self.layers, self.values)]
        return [header, *body]

    def to_text(self) -> str:
        grid = self._grid()
        widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in grid]
        title = f"sensitivity ({self.granularity} pruning, one layer at a time); baseline {self.baseline:.4f}"
        return "\n".join([title, *lines])

    def to_markdown(self) -> str:
        grid = self._grid()
        lines = ["| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
        lines += ["| " + " | ".join(r) + " |" for r in grid[1:]]
        return "\n".join([f"baseline: {self.baseline:.4f}", "", *lines])

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, ax) -> None:
        """Draw the curves on a matplotlib Axes: one per layer, metric against sparsity, baseline dashed."""
        for layer, row in zip(self.layers, self.values):
            ax.plot(self.sparsities, row, marker="o", label=layer)
        ax.axhline(self.baseline, linestyle="--", color="grey", label="baseline")
        ax.set(xlabel="sparsity", ylabel="metric", title=f"Pruning sensitivity ({self.granularity})")
        ax.legend(fontsize="small")

    def save_plot(self, path: str | Path) -> Path:
        """Write a PNG: one curve per layer, metric against sparsity, baseline dashed."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise MissingDependencyError("sensitivity plots need matplotlib: pip install 'fxcompress[draw]'") from exc
        fig, ax = plt.subplots(figsize=(7, 4.5))
        self.plot(ax)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)
        return Path(path)


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, granularity: str = "element", *,
                importance: Importance = "abs", layers: str | None = None, progress: bool = False) -> SensitivityTable:
    """Evaluate `model` with each linear / conv layer alone pruned to each sparsity.

    `evaluate(model) -> float` is any metric (accuracy, negative loss); `layers` is a full-match
    regex over layer names (None: every layer); `progress` shows a tqdm bar over the sweep naming the
    layer and sparsity being evaluated (off where the output is not a terminal).
    """
    for s in sparsities:
        check_real("sensitivity", "sparsities", s, 0.0, 1.0)
    check_choice("sensitivity", "granularity", granularity, GRANULARITIES)
    targets = _prunable(model, layers)
    baseline = float(evaluate(model))
    values = []
    with tqdm(total=len(targets) * len(sparsities), desc="sensitivity", unit="eval",
              disable=None if progress else True, leave=False) as bar:
        for name, module, kind in targets:
            values.append(tuple(_sweep_layer(model, evaluate, (name, module, kind), sparsities,
                                             (granularity, importance), bar)))
    return SensitivityTable(tuple(t[0] for t in targets), tuple(sparsities), tuple(values), baseline, granularity)


def _prunable(model: nn.Module, pattern: str | None) -> list[tuple[str, nn.Module, str]]:
    found = [(name, m, kind) for name, m in model.named_modules() if (kind := kind_of_type(type(m))) is not None]
    if pattern is not None:
        found = [t for t in found if re.fullmatch(pattern, t[0])]
    if not found:
        raise ConfigError(f"sensitivity: no linear / conv layer matches layers={pattern!r}")
    return found


def _sweep_layer(model, evaluate, target, sparsities, how, bar) -> list[float]:
    """The metric at each sparsity for one layer; its weight is restored after every evaluation."""
    name, module, kind = target
    granularity, importance = how
    weight = module.weight
    dims = group_dims(granularity, kind, weight.ndim, name)
    scores = masked_scores(weight, getattr(module, "weight_mask", None), dims, importance)
    saved = weight.detach().clone()
    row = []
    for s in sparsities:
        bar.set_postfix_str(f"{name} at {s:g}")
        keep = keep_highest(scores, count_to_prune(s, scores.numel())).expand(weight.shape)
        try:
            with torch.no_grad():
                weight.mul_(keep)
            row.append(float(evaluate(model)))
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        bar.update(1)
    return row
