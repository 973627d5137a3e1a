"""The check an ONNX file passes before it is kept: ONNX Runtime loads it and runs it on inputs whose outputs the
graph gave, with the graph's output shapes and values (float files within a float tolerance; int8 QDQ files within
one step of their last activation grids, `int8_check`)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .int8_check import out_of_bounds, saturation_hint


# how far ONNX Runtime's float outputs may be from the graph's, relative to the outputs' size (at least 1): float32
# rounding in another order of sums is far below it; an op the exporter wrote otherwise is far above it
RUNTIME_TOLERANCE = 1e-3


def run_in_onnx_runtime(path: str, input_names: list[str], output_names: list[str],
                        checks: list[tuple[tuple, list[torch.Tensor]]], compare_values: bool,
                        qdq: torch.nn.Module | None = None) -> None:
    """Run the written file in ONNX Runtime on each (inputs, the graph's outputs) of `checks`: it must load, run,
    give outputs of the graph's shapes and, with `compare_values` (the float export), the graph's values within
    RUNTIME_TOLERANCE, or, given the QDQ module `qdq` whose outputs `checks` hold (the int8 export: ORT runs
    other kernels on the same codes), its values within one step of its last activation grids
    (`int8_check.out_of_bounds`). The exporter translates op by op and some translations are wrong for some
    graphs (ONNX Runtime then fails far from the cause, at every batch): such a file is refused here, not left
    for the user to find. Without onnxruntime, not run."""
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ConfigError(f"to_onnx: ONNX Runtime cannot load the exported model: {first_line(exc)}") from exc
    takes = {value.name for value in session.get_inputs()}
    for batch_inputs, expected in checks:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names, batch_inputs) if name in takes}
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(input_names, batch_inputs))
        try:
            got = session.run(output_names, feed)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
            raise ConfigError(f"to_onnx: the exported model fails in ONNX Runtime on {shapes} where the graph runs "
                              f"(the exporter wrote an op otherwise than torch computes it): "
                              f"{first_line(exc)}") from exc
        for name, value, reference in zip(output_names, got, expected):
            reference = reference.detach().cpu()
            if tuple(value.shape) != tuple(reference.shape):
                raise ConfigError(f"to_onnx: output {name!r} of the exported model on {shapes} is {value.shape}, "
                                  f"the graph's {tuple(reference.shape)}")
            if not compare_values or reference.numel() == 0:
                continue
            if not _same(value, reference):
                raise ConfigError(f"to_onnx: output {name!r} of the exported model on {shapes} differs from the "
                                  "graph's in ONNX Runtime (the exporter wrote an op otherwise than torch computes it)")
        if qdq is not None:
            found = out_of_bounds(qdq, batch_inputs, got, expected)
            if found is not None:
                index, where = found
                raise ConfigError(f"to_onnx: output {output_names[index]!r} of the int8 exported model on {shapes} "
                                  f"differs from the QDQ graph's in ONNX Runtime {where} (the file computes "
                                  f"otherwise than the graph){saturation_hint(qdq)}")


def _same(value: np.ndarray, reference: torch.Tensor) -> bool:
    """Integers equal; floats within RUNTIME_TOLERANCE where the graph's are finite, and its NaN and infinities
    where they are not."""
    if not reference.is_floating_point():
        return np.array_equal(value, reference.numpy())
    expected, got = reference.double().numpy(), value.astype(np.float64)
    finite = np.isfinite(expected)
    if not np.array_equal(expected[~finite], got[~finite], equal_nan=True):
        return False
    if not finite.any():
        return True
    difference = float(np.abs(got[finite] - expected[finite]).max())  # NaN where ours is finite: not within
    return difference <= RUNTIME_TOLERANCE * max(1.0, float(np.abs(expected[finite]).max()))


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
