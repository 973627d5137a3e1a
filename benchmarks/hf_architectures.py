"""Hugging Face architectures beyond the six the tests build, through the export front end and our pipelines.

    python benchmarks/hf_architectures.py [--models qwen2 falcon ...]

Each architecture is built from a small config with random weights (nothing downloads), exported with
torch.export, then compiled with each pipeline below: the front end alone (its logits must equal the eager
model's), channel pruning (default and whole heads), Deep Compression (masks, 4-bit k-means, LowerToEncoded),
8-bit integers (LowerToInteger native), SparseGPT + GPTQ 4-bit + LowerWeightOnly, AWQ scales, dynamic int8.
Every compile verifies its passes; every result is saved to our file format and loaded back, and must give
the same logits bit for bit. A last column writes GPTQ 4-bit as a compressed-tensors checkpoint that
transformers loads with the model's own class (`not loaded` where transformers' loader fails on it). A cell says `ok`, or `refused` with the typed error's class (its message below
the table); anything else (an untyped exception, logits that differ) is a defect and is printed as one. The ONNX
column compiles the model itself (exported with a free batch and length), writes it with `export.to_onnx` and runs
it in ONNX Runtime on a batch of three, the example having two (token ids of length 5, a symbolic length in the
file). The lengths column runs the model compiled as it is on token ids of lengths 1, 5, 13 and 64
(the example's is 8): its logits within float32 rounding of the eager model's, and a length the model refuses
(past its position table) refused by the graph too.
"""
import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the architecture table lives with the tests
from hfmodels import MODELS, build, logits  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.errors import FxCompressError  # noqa: E402
from fxcompress.fileformat.container import from_bytes, to_bytes  # noqa: E402
from fxcompress.passes import (  # noqa: E402
    ActivationConfig, InsertFakeQuant, InsertMasks, LowerDynamicInt8, LowerToEncoded, LowerToInteger, LowerWeightOnly,
    PruneChannels, ScaleChannels, SparseGPT)


def pipelines() -> dict:
    activations = ActivationConfig(bits=8)
    return {
        "front end": [],
        "prune": [PruneChannels(amount=0.3)],
        "prune heads": [PruneChannels(amount=0.5, attention="heads")],
        "deep compression": [InsertMasks(sparsity=0.7), InsertFakeQuant(method="kmeans", bits=4), LowerToEncoded()],
        "int8 native": [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                        activations=activations), LowerToInteger(backend="native", repeats=1)],
        "SparseGPT + GPTQ 4-bit": [SparseGPT(sparsity=0.5),
                                   InsertFakeQuant(method="linear", bits=4, symmetric=True, per_channel=True,
                                                   rounding="gptq", types=("linear",)), LowerWeightOnly(repeats=1)],
        "AWQ": [ScaleChannels(method="awq", group_size=None, grid=5, clip=False)],
        "dynamic int8": [LowerDynamicInt8(repeats=1)],
    }


def run(name: str) -> tuple[dict[str, str], list[str]]:
    """Each pipeline's cell for one architecture, and the refusals' and defects' messages."""
    model, x, other = build(name)
    with torch.no_grad():
        reference = logits(model(x))
    program = torch.export.export(model, (x,), strict=False)
    cells, notes = {}, []
    for label, passes in pipelines().items():
        cells[label] = _cell(name, label, notes, lambda passes=passes, label=label: _pipeline(
            program, passes, x, other, reference if label == "front end" else None))
    cells["compressed-tensors"] = _compressed_tensors(model, program, x, other, name, notes)
    front = functools.cache(lambda: fxcompress.compile(model, [], example_inputs=(x,)))  # both columns read it
    cells["lengths"] = "-" if x.is_floating_point() else _cell(name, "lengths", notes,
                                                               lambda: _lengths(front(), model, x))
    cells["ONNX"] = _cell(name, "ONNX", notes, lambda: _onnx(front(), x, other))
    return cells, notes


def _pipeline(program, passes: list, x, other, reference) -> str | None:
    """The program compiled with `passes` (verified by compile), saved and loaded: the loaded file must compute its
    logits bit for bit, and with a `reference` (the front end alone) so must the graph the eager model's."""
    gm = fxcompress.compile(program, passes, example_inputs=(x,), calibration_data=[x, other])
    with torch.no_grad():
        out = logits(gm(x))
        again = logits(from_bytes(to_bytes(gm, example_inputs=(x,)))(x))
    if reference is not None and not torch.equal(out, reference):
        return f"logits differ from the eager model's by {float((out - reference).abs().max()):.3g}"
    return None if torch.equal(again, out) else "the loaded file computes other logits"


def _cell(name: str, column: str, notes: list[str], check) -> str:
    """The cell of `check()`, which returns a defect's message or None: "ok", "DEFECT" (the message noted), or, as
    in `run`, a typed refusal or an untyped exception (a defect) with its message noted."""
    try:
        defect = check()
    except FxCompressError as exc:
        notes.append(f"{name} / {column}: {type(exc).__name__}: {' '.join(str(exc).split())[:240]}")
        return f"refused ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - what the table exists to find
        notes.append(f"{name} / {column}: untyped {type(exc).__name__}: {' '.join(str(exc).split())[:240]}")
        return "DEFECT"
    if defect:
        notes.append(f"{name} / {column}: {defect}")
        return "DEFECT"
    return "ok"


LENGTHS = (1, 5, 13, 64)  # other prompt lengths than the example's 8, to the configs' position tables


def _lengths(gm, model, x) -> str | None:
    """The model compiled as it is (the front end exports token ids with a free batch and length) run on token ids of
    other lengths: its logits must be the eager model's within float32 rounding (1e-5 of their size), and a length
    the eager model refuses (past a position table) must fail in the graph too."""
    for length in LENGTHS:
        tokens = torch.randint(3, 100, (x.shape[0], length))
        with torch.no_grad():
            try:
                expected = logits(model(tokens))
            except Exception:  # noqa: BLE001 - the model's own refusal of the length: the graph must refuse it too
                expected = None
            try:
                got = logits(gm(tokens))
            except Exception as exc:  # noqa: BLE001 - a graph failing where the model runs is the defect
                if expected is None:
                    continue
                return f"the graph fails at length {length}, where the model runs: {type(exc).__name__}"
        if expected is None:
            return f"the graph runs length {length}, which the model refuses"
        if float((got - expected).abs().max()) > 1e-5 * max(1.0, float(expected.abs().max())):
            return f"the logits at length {length} differ from the eager model's by {(got - expected).abs().max():.3g}"
    return None


def _onnx(gm, x, other) -> str | None:
    """The model compiled as it is (the front end exports it with a free batch, and token ids with a free length),
    written by `export.to_onnx` with a dynamic batch (and length) and run by ONNX Runtime on a batch of three (the
    example has two; token ids of length 5, the example's 8): its logits must be ours within float32 rounding
    (1e-5 of their size)."""
    import tempfile
    import onnxruntime
    from fxcompress.export import to_onnx
    tokens = not x.is_floating_point()
    batch = torch.cat([x, other[:1]])[:, :5] if tokens else torch.cat([x, other[:1]])  # token ids: another length
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        to_onnx(gm, Path(folder) / "model.onnx", (x,), dynamic_axes={"input_ids": {1: "length"}} if tokens else None)
        session = onnxruntime.InferenceSession(str(Path(folder) / "model.onnx"))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
        expected = logits(gm(batch))
    difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if difference > 1e-5 * max(1.0, float(expected.abs().max())):
        return f"ONNX Runtime's logits on {tuple(batch.shape)} differ from ours by {difference:.3g}"
    return None


def _compressed_tensors(model, program, x, other, name: str, notes: list[str]) -> str:
    """GPTQ 4-bit (per channel, symmetric) written as a compressed-tensors checkpoint and loaded by transformers
    itself (the model's own class, from the folder): its logits must be the fake-quant model's, bit for bit."""
    import tempfile
    from fxcompress.compressed_tensors import to_compressed_tensors
    grid = InsertFakeQuant(method="linear", bits=4, symmetric=True, per_channel=True, rounding="gptq",
                           types=("linear",))
    try:
        gm = fxcompress.compile(program, [grid], example_inputs=(x,), calibration_data=[x, other])
        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            to_compressed_tensors(gm, folder, config=model.config.to_dict())
            loaded = type(model).from_pretrained(folder).eval()
            same = torch.equal(logits(loaded(x)), logits(gm(x)))
    except FxCompressError as exc:
        notes.append(f"{name} / compressed-tensors: {type(exc).__name__}: {' '.join(str(exc).split())[:240]}")
        return f"refused ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - transformers' loader failing on the checkpoint is reported as such
        notes.append(f"{name} / compressed-tensors: transformers could not load it: {type(exc).__name__}: "
                     f"{' '.join(str(exc).split())[:200]}")
        return "not loaded"
    if not same:
        notes.append(f"{name} / compressed-tensors: transformers' logits differ from the fake-quant model's")
    return "ok" if same else "DEFECT"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers
    transformers.logging.set_verbosity_error()
    labels = [*pipelines(), "compressed-tensors", "lengths", "ONNX"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| model | " + " | ".join(labels) + " | s |")
    print("|---|" + "---|" * (len(labels) + 1))
    notes, tally, start = [], {}, time.perf_counter()
    for name in args.models:
        began = time.perf_counter()
        cells, found = run(name)
        notes += found
        for cell in cells.values():
            tally[cell] = tally.get(cell, 0) + 1
        print(f"| {name} | " + " | ".join(cells[label] for label in labels) + f" | {time.perf_counter() - began:.0f} |",
              flush=True)
    print(f"\n{len(args.models)} architectures x {len(labels)} pipelines in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{count} {cell}" for cell, count in sorted(tally.items())))
    for note in notes:
        print("-", note)
    if tally.get("DEFECT"):
        sys.exit(1)


if __name__ == "__main__":
    main()
