"""compile()'s own steps against what they replaced, one thread, interleaved, medians of CPU seconds.

1. The shape step (`propagate_shapes`) against torch.fx's ShapeProp on each zoo model (the same
   `tensor_meta`; tests/test_analysis.py checks it field by field), with the model's own forward as
   the floor either must pay.
2. The lowest-n selection of a layer (`LowestN.find`) with few scores (kthvalue on the kept keys)
   against the two streamed histograms it takes for many (forced here by setting the limit to 0):
   the same threshold key and ties owed, checked on every round.
3. compile()'s checking steps, on each zoo model traced: before the first pass, the input check
   (a forward) and the shape step apart against the one run that serves both; after a pass that
   changed the graph, verification (lint, recompile, forward) and the shape step apart against lint,
   recompile and one run. The shared runs' shapes and output structure are checked equal to the
   separate steps' on every model.

    python benchmarks/bench_compile_overhead.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.fx.passes.shape_prop import ShapeProp

from fxcompress.analyses.shapes import propagate_shapes, shapes_and_outputs
from fxcompress.execution import evaluating
from fxcompress.pruning import selection
from fxcompress.pruning.selection import LowestN
from fxcompress.tracing import trace
from fxcompress.verify import OutputSignature, check_example_inputs, check_graph, check_outputs, verify_graph
from fxcompress.zoo import ZOO


def cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def shape_rows(repeats: int) -> list[str]:
    rows = []
    for name in sorted(ZOO):
        make_model, make_input = ZOO[name]
        gm, x = trace(make_model().eval()), (make_input(),)

        def torch_shapes():
            with evaluating(gm):
                ShapeProp(gm).propagate(*x)

        def forward():
            with evaluating(gm):
                gm(*x)
        steps = {"torch": torch_shapes, "ours": lambda: propagate_shapes(gm, x), "forward": forward}
        times = {k: [] for k in steps}
        for _ in range(repeats):
            for k, fn in steps.items():
                times[k].append(cpu(fn))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        over = (med["ours"] - med["forward"]) / max(med["torch"] - med["forward"], 1e-9)
        rows.append(f"| {name} | {len(gm.graph.nodes)} | {med['torch']:.2f} | {med['ours']:.2f} | "
                    f"{med['forward']:.2f} | {med['ours'] / med['torch']:.2f} | {over:.2f} |")
    return rows


def selection_rows(repeats: int) -> list[str]:
    rows = []
    for shape in ((10, 84), (120, 400), (300, 784), (256, 256)):
        scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        n = round(0.7 * scores.numel())
        batches = lambda: [("fc", scores)]  # noqa: E731
        small = selection._SMALL
        times = {"streamed": [], "ranked": []}
        for _ in range(repeats):
            selection._SMALL = 0
            found = {}
            times["streamed"].append(cpu(lambda: found.update(streamed=LowestN.find(batches, n))))
            selection._SMALL = small
            times["ranked"].append(cpu(lambda: found.update(ranked=LowestN.find(batches, n))))
            assert vars(found["streamed"]) == vars(found["ranked"]), shape
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append(f"| {shape[0]}x{shape[1]} | {med['streamed']:.3f} | {med['ranked']:.3f} | "
                    f"{med['ranked'] / med['streamed']:.3f} |")
    return rows


def _medians(steps: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(cpu(fn))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def checking_rows(repeats: int) -> list[str]:
    rows = []
    for name in sorted(ZOO):
        make_model, make_input = ZOO[name]
        gm, x = trace(make_model().eval()), (make_input(),)
        expected = OutputSignature.of(check_example_inputs(gm, x))
        shapes, outputs = shapes_and_outputs(gm, x)
        assert shapes == propagate_shapes(gm, x) and OutputSignature.of(outputs) == expected, name

        def shared_after():
            check_graph(gm, "bench")
            check_outputs(gm, shapes_and_outputs(gm, x)[1], expected, "bench")
        med = _medians({
            "first apart": lambda: (check_example_inputs(gm, x), propagate_shapes(gm, x)),
            "first shared": lambda: shapes_and_outputs(gm, x),
            "after apart": lambda: (verify_graph(gm, x, expected, "bench"), propagate_shapes(gm, x)),
            "after shared": shared_after}, repeats)
        rows.append(f"| {name} | {med['first apart']:.2f} | {med['first shared']:.2f} | "
                    f"{med['first shared'] / med['first apart']:.2f} | {med['after apart']:.2f} | "
                    f"{med['after shared']:.2f} | {med['after shared'] / med['after apart']:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | nodes | ShapeProp ms | ours ms | forward ms | ratio | overhead ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(shape_rows(args.repeats)))
    print("\n| scores | histograms ms | kthvalue ms | ratio |")
    print("|---|---|---|---|")
    print("\n".join(selection_rows(args.repeats)))
    print("\n| model | input check + shapes ms | one run ms | ratio | verify + shapes ms | "
          "lint, recompile, one run ms | ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(checking_rows(args.repeats)))


if __name__ == "__main__":
    main()
