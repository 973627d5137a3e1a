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
4. Layer lookups, against the previous code (kept below as `_Old`, patched in for its
   rows): on each zoo model after InsertMasks, `find_layers`, `layer_node` of every layer found
   before the pass (their nodes were renamed: the lookup by weight) and `tied_readers` of every
   layer; and the whole `compile(model, [InsertMasks(sparsity=0.5)])`. Every lookup's answer is checked
   equal to the old code's.

    python benchmarks/bench_compile_overhead.py [--repeats 15] [--section lookups]
"""
from __future__ import annotations

import argparse
import operator
import statistics
import time
from contextlib import contextmanager

import torch
from torch.fx.passes.shape_prop import ShapeProp

import fxcompress
from fxcompress import layers
from fxcompress.analyses.shapes import propagate_shapes, shapes_and_outputs
from fxcompress.passes import InsertMasks
from fxcompress.pruning import masks
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


class _Old:
    """The lookups as they were: every module path through get_submodule, the stale-layer lookup
    through find_layers' whole list, and tied_readers asking each node's kind and weight apart."""

    @staticmethod
    def kind_of_node(gm, node):
        if node.op == "call_module":
            return layers._BY_MODULE.get(type(gm.get_submodule(node.target)))
        return layers._BY_FUNCTION.get(node.target) if node.op == "call_function" else None

    @staticmethod
    def stored_weight(gm, node):
        if node.op == "call_module":
            return gm.get_submodule(node.target).weight
        source = layers.weight_source(node)
        if source is None:
            return None
        return operator.attrgetter(source.target)(gm) if source.op == "get_attr" else gm.get_submodule(source.target)

    @staticmethod
    def find_layers(gm):
        found, owners = [], {}
        for node in gm.graph.nodes:
            kind = _Old.kind_of_node(gm, node)
            if kind is None:
                continue
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
                layer = layers.Layer(node.target, kind.name, node.name, f"{node.target}.weight", bias)
            else:
                source = layers.weight_source(node)
                if source is None:
                    continue
                bias_node = layers.bias_arg(node)
                bias = bias_node.target if bias_node is not None and bias_node.op == "get_attr" else None
                owner, _, _ = source.target.rpartition(".")
                layer = layers.Layer(owner or source.target, kind.name, node.name, source.target, bias)
            tensor = _Old.stored_weight(gm, node)
            first = owners.setdefault(id(tensor), layer) if tensor is not None else layer
            if first is not layer:
                name = layer.name if layer.name != first.name else layers._module_path(node, first.name) or node.name
                layer = layers.Layer(name, layer.kind, layer.node, layer.weight, layer.bias, tied_to=first.name)
            found.append(layer)
        return found

    @staticmethod
    def layer_node(gm, layer):
        for node in gm.graph.nodes:
            if node.name == layer.node:
                return node
        for found in _Old.find_layers(gm):
            if found.weight == layer.weight or found.name == layer.name:
                return next(n for n in gm.graph.nodes if n.name == found.node)
        raise KeyError(layer.name)

    @staticmethod
    def tied_readers(gm, node):
        tensor = _Old.stored_weight(gm, node)
        if tensor is None:
            return []
        return [other for other in gm.graph.nodes if other is not node and _Old.kind_of_node(gm, other) is not None
                and _Old.stored_weight(gm, other) is tensor]


@contextmanager
def _old_code():
    """The old lookups in place of the new, wherever compile and the masks reach them."""
    patches = [(layers, "find_layers", _Old.find_layers), (layers, "layer_node", _Old.layer_node),
               (layers, "tied_readers", _Old.tied_readers), (masks, "find_layers", _Old.find_layers),
               (masks, "layer_node", _Old.layer_node)]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def lookup_rows(repeats: int) -> list[str]:
    rows = []
    for name in sorted(ZOO):
        make_model, make_input = ZOO[name]
        model, x = make_model().eval(), (make_input(),)
        stale = layers.find_layers(trace(model))
        gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=x)
        nodes = [layers.layer_node(gm, layer) for layer in stale]
        assert nodes == [_Old.layer_node(gm, layer) for layer in stale], name
        assert layers.find_layers(gm) == _Old.find_layers(gm), name
        assert all(layers.tied_readers(gm, n) == _Old.tied_readers(gm, n) for n in nodes), name

        def compiled():
            fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=x)

        def compiled_old():
            with _old_code():
                compiled()
        med = _medians({
            "find old": lambda: _Old.find_layers(gm), "find": lambda: layers.find_layers(gm),
            "node old": lambda: [_Old.layer_node(gm, layer) for layer in stale],
            "node": lambda: [layers.layer_node(gm, layer) for layer in stale],
            "tied old": lambda: [_Old.tied_readers(gm, n) for n in nodes],
            "tied": lambda: [layers.tied_readers(gm, n) for n in nodes],
            "compile old": compiled_old, "compile": compiled}, repeats)
        rows.append(f"| {name} | {len(gm.graph.nodes)} | " + " | ".join(
            f"{med[k + ' old']:.2f} / {med[k]:.2f} ({med[k] / med[k + ' old']:.2f})"
            for k in ("find", "node", "tied", "compile")) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--section", choices=("all", "shapes", "selection", "checking", "lookups"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = {"shapes", "selection", "checking", "lookups"} if args.section == "all" else {args.section}
    if "shapes" in wanted:
        print("| model | nodes | ShapeProp ms | ours ms | forward ms | ratio | overhead ratio |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(shape_rows(args.repeats)))
    if "selection" in wanted:
        print("\n| scores | histograms ms | kthvalue ms | ratio |")
        print("|---|---|---|---|")
        print("\n".join(selection_rows(args.repeats)))
    if "checking" in wanted:
        print("\n| model | input check + shapes ms | one run ms | ratio | verify + shapes ms | "
              "lint, recompile, one run ms | ratio |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(checking_rows(args.repeats)))
    if "lookups" in wanted:
        print("\nms old / new (ratio)\n\n| model | nodes | find_layers | layer_node, stale layers | "
              "tied_readers, each layer | compile + InsertMasks |")
        print("|---|---|---|---|---|---|")
        print("\n".join(lookup_rows(args.repeats)))


if __name__ == "__main__":
    main()
