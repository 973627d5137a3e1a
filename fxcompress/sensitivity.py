"""Pruning sensitivity: prune one layer at a time at each sparsity and measure the model (as Distiller does).

    table = fxcompress.sensitivity(model, lambda m: evaluate(m, x, y), sparsities=[0.5, 0.7, 0.9])
    print(table.to_markdown()); table.save_plot("sensitivity.png")
    per_layer = table.max_sparsity(tolerance=0.005)   # the most each layer tolerates on its own
    table.save("sensitivity.json"); SensitivityTable.load("sensitivity.json")   # the report reads these

Layers are pruned in place and restored after each evaluation, so the sweep needs no copy of the
model. A layer that already carries a mask is pruned further from it (its pruned weights stay pruned).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from .config import Regex, TypeOf, check, check_choice, check_real
from .errors import ConfigError, FormatError, MissingDependencyError
from .layers import chain_transforms, find_layers, kind_of_type, layer_node
from .pruning.importance import (GRANULARITIES, Importance, count_to_prune, group_layout, keep_highest, masked_scores,
                                 split_groups)
from .summary import LOWERED

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SensitivityTable:
    """`values[i][j]` is the metric with layer `layers[i]` alone pruned to `sparsities[j]`."""

    layers: tuple[str, ...]
    sparsities: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]
    baseline: float
    granularity: str
    metric: str = "metric"  # what `evaluate` measured, for the plot and the report ("accuracy")

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
        ax.set(xlabel="sparsity of the one pruned layer", ylabel=self.metric,
               title=f"Pruning sensitivity ({self.granularity}-wise)")
        ax.legend(fontsize="small")

    def to_dict(self) -> dict[str, Any]:
        return {"format": JSON_FORMAT, "granularity": self.granularity, "baseline": self.baseline, "metric": self.metric,
                "sparsities": list(self.sparsities), "layers": list(self.layers),
                "values": [list(row) for row in self.values]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "sensitivity table") -> SensitivityTable:
        """The table `to_dict` wrote; FormatError naming the field for anything else."""
        if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
            raise FormatError(f"{source}: not a sensitivity table (its 'format' must be {JSON_FORMAT!r})")
        layers, sparsities = _list_of(data, "layers", str, source), _list_of(data, "sparsities", float, source)
        values = data.get("values")
        if not (isinstance(values, list) and len(values) == len(layers)
                and all(isinstance(row, list) and len(row) == len(sparsities) and all(map(_is_number, row))
                        for row in values)):
            raise FormatError(f"{source}: 'values' must be {len(layers)} rows (one per layer) of "
                              f"{len(sparsities)} numbers (one per sparsity)")
        if not _is_number(data.get("baseline")) or data.get("granularity") not in GRANULARITIES:
            raise FormatError(f"{source}: 'baseline' must be a number and 'granularity' one of "
                              f"{', '.join(GRANULARITIES)}")
        metric = data.get("metric", "metric")
        if not isinstance(metric, str):
            raise FormatError(f"{source}: 'metric' must be a name, got {metric!r}"[:300])
        return cls(tuple(layers), tuple(map(float, sparsities)), tuple(tuple(map(float, row)) for row in values),
                   float(data["baseline"]), data["granularity"], metric)

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (what `load` and `fxcompress report --sensitivity FILE` read)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: not JSON ({exc})") from None
        return cls.from_dict(data, str(path))

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


JSON_FORMAT = "fxcompress-sensitivity-1"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(data: dict, key: str, kind: type, source: str) -> list:
    items = data.get(key)
    ok = isinstance(items, list) and items and all(isinstance(i, str) if kind is str else _is_number(i) for i in items)
    if not ok:
        raise FormatError(f"{source}: {key!r} must be a non-empty list of "
                          f"{'names' if kind is str else 'numbers'}, got {items!r}"[:300])
    return items


def sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, granularity: str = "element", *,
                importance: Importance = "abs", layers: str | None = None, progress: bool = False,
                metric: str = "metric") -> SensitivityTable:
    """Evaluate `model` with each linear / conv layer alone pruned to each sparsity.

    `evaluate(model) -> float` is any metric (accuracy, negative loss), `metric` its name in tables
    and plots; `layers` is a full-match
    regex over layer names (None: every layer); `progress` shows a tqdm bar over the sweep naming the
    layer and sparsity being evaluated (off where the output is not a terminal).
    """
    for s in sparsities:
        check_real("sensitivity", "sparsities", s, 0.0, 1.0)
    check_choice("sensitivity", "granularity", granularity, GRANULARITIES)
    check("sensitivity", "layers", layers, Regex(), None)  # before the baseline's evaluation, not a bare re.error
    targets = _prunable(model, layers)
    evaluate = _restoring_buffers(model, evaluate)
    baseline = evaluate(model)
    values = []
    with tqdm(total=len(targets) * len(sparsities), desc="sensitivity", unit="eval",
              disable=None if progress else True, leave=False) as bar:
        for name, module, kind in targets:
            values.append(tuple(_sweep_layer(model, evaluate, (name, module, kind), sparsities,
                                             (granularity, importance), bar)))
    check("sensitivity", "metric", metric, TypeOf(str, what="a name"))
    return SensitivityTable(tuple(t[0] for t in targets), tuple(sparsities), tuple(values), baseline, granularity,
                            metric)


def _restoring_buffers(model: nn.Module, evaluate: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    """`evaluate`, after which (returning or raising) every buffer holds what it held before the sweep.

    An evaluation that runs the model in training mode updates BatchNorm's running statistics and the
    activation observers; left alone, each later evaluation (and the model after the sweep) would see
    statistics gathered with some layer pruned. Boolean buffers (masks) are not copied: forwards never
    write them, and a large model's masks are as many bytes as it has weights."""
    saved = [(module, name, tensor, tensor.detach().clone())
             for module in model.modules() for name, tensor in module._buffers.items()
             if tensor is not None and tensor.dtype != torch.bool]

    def run(m: nn.Module) -> float:
        try:
            return float(evaluate(m))
        finally:
            with torch.no_grad():
                for module, name, tensor, copy in saved:
                    module._buffers[name] = tensor  # the very tensor: one the evaluation replaced is put back
                    tensor.copy_(copy)  # always: torch.equal calls -0.0 and 0.0 (and no NaN) equal
    return run


def _graph_layers(gm: GraphModule, found: list[tuple[str, nn.Module, str]]) -> list[tuple[str, nn.Module, str]]:
    """The functional layers of a GraphModule (a loaded file's owners are plain modules) not found by type;
    a layer computing with a transformed weight (fake-quant, encoded) is refused: pruning its stored
    weight would not change what it computes."""
    known = {name for name, _, _ in found}
    extra = []
    for layer in find_layers(gm):
        transforms = chain_transforms(gm, layer_node(gm, layer)) if layer.node else []
        if transforms:
            raise ConfigError(f"sensitivity: layer {layer.name} computes with its weight through "
                              f"{', '.join(type(t).__name__ for t in transforms)}; pruning the stored weight "
                              "would change nothing: sweep the decoded model (fxcompress.decode(gm))")
        owner, _, attribute = layer.weight.rpartition(".")
        if layer.name not in known and attribute == "weight" and layer.tied_to is None:
            extra.append((layer.name, gm.get_submodule(owner), layer.kind))
    return extra


def prunable_layers(model: nn.Module, layers: str | None = None) -> tuple[str, ...]:
    """The names of the layers `sensitivity(model, ..., layers=layers)` sweeps, found without evaluating
    anything; ConfigError for a pattern that is no regular expression or matches no layer."""
    check("sensitivity", "layers", layers, Regex(), None)
    return tuple(name for name, _, _ in _prunable(model, layers))


def _prunable(model: nn.Module, pattern: str | None) -> list[tuple[str, nn.Module, str]]:
    found = [(name, m, kind) for name, m in model.named_modules() if (kind := kind_of_type(type(m))) is not None]
    if isinstance(model, GraphModule):
        found += _graph_layers(model, found)
    if pattern is not None:
        found = [t for t in found if re.fullmatch(pattern, t[0])]
    if not found:
        # a lowered layer (integer, weight-only, dynamic int8, sparse) holds no float weight to prune: say so,
        # rather than that the model has no layers
        lowered = [name for name, m in model.named_modules() if isinstance(m, LOWERED)]
        held = (f"; {', '.join(lowered[:5])}{' ...' if len(lowered) > 5 else ''} are lowered to run-time modules "
                "that hold no float weight to prune: sweep the model before lowering") if lowered else ""
        raise ConfigError(f"sensitivity: no linear / conv layer matches layers={pattern!r}{held}")
    return found


def _sweep_layer(model, evaluate, target, sparsities, how, bar) -> list[float]:
    """The metric at each sparsity for one layer; its weight is restored after every evaluation."""
    name, module, kind = target
    granularity, importance = how
    weight = module.weight
    # a grouped conv's channels are its real input channels, as InsertMasks groups them (group_layout)
    dims, split = group_layout(granularity, kind, weight.ndim, name, getattr(module, "groups", 1))
    scores = masked_scores(weight, getattr(module, "weight_mask", None), dims, importance, split)
    grouped_shape = split_groups(weight, split).shape
    saved = weight.detach().clone()
    row = []
    for s in sparsities:
        bar.set_postfix_str(f"{name} at {s:g}")
        keep = keep_highest(scores, count_to_prune(s, scores.numel())).expand(grouped_shape).reshape(weight.shape)
        try:
            with torch.no_grad():
                weight.mul_(keep)
            row.append(evaluate(model))
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        bar.update(1)
    return row
