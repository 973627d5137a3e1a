"""`fxcompress inspect | report | decode | export`: look into a compressed file (as text, or as an HTML
report with pictures and its Markdown), decode it, export its weights.

decode writes a dense model: a `.fxc` OUT is the dense GraphModule in the fxcompress file format
(load it with fxcompress.load, pickle-free); a `.pt` / `.pth` OUT is a plain PyTorch state dict
(`torch.load(OUT, weights_only=True)`), whose names are the GraphModule's (`fc1.weight`, ...).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.fx.passes.shape_prop import TensorMetadata

from ..encoded.decode import decode
from ..errors import ConfigError, FormatError
from ..execution import NodeLocatingInterpreter, evaluating
from ..export import sparse_arrays, to_json, to_onnx
from ..fileformat import load, save
from ..draw import DEFAULT_MAX_NODES
from ..report import write_report
from ..sensitivity import SensitivityTable
from ..summary import summary
from ..training import torch_threads
from .arguments import not_the_input
from .sweep import add_sweep_arguments, check_layers_pattern, sweep, sweep_data

STATE_DICT_SUFFIXES = (".pt", ".pth")
BYTE_COLUMNS = ("layer", "dense_bytes", "compressed_bytes", "exact")  # the per-layer bytes table of inspect


def _load(path: str):
    """fxcompress.load, its FormatError naming the file as well as the part."""
    try:
        return load(path)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from None


def _per_layer_bytes(rows) -> str:
    parts = sorted({k for row in rows for k in row if k.startswith("bytes_")})
    head = [*BYTE_COLUMNS, *(p.removeprefix("bytes_") for p in parts)]
    cells = [head, *([str(row.get(c, "")) for c in (*BYTE_COLUMNS, *parts)] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _example(gm, args: argparse.Namespace) -> tuple[torch.Tensor, ...] | None:
    """--input-shape as one input of zeros, run through the model once node by node: a shape the model
    cannot take is a ConfigError naming the option and the node that fails (a bare RuntimeError from
    deep inside shape propagation or the ONNX export otherwise)."""
    if not args.input_shape:
        return None
    example = (torch.zeros(_input_shape(args.input_shape)),)
    interpreter = NodeLocatingInterpreter(gm)  # not gm(...): a GraphModule prints its failing line to stderr
    try:
        with evaluating(gm):
            interpreter.run(*example)
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on these inputs is the shape's fault
        node = interpreter.current
        where = f" at node {_node(gm, node)}" if node is not None else ""
        cause = str(exc).split("\n\nWhile executing")[0]  # torch.fx appends the node, named here already
        raise ConfigError(f"--input-shape {args.input_shape}: {args.file} cannot run on an input of shape "
                          f"{tuple(example[0].shape)}{where}: {' '.join(cause.split())[:300]}") from None
    return example


def _node(gm, node) -> str:
    """`fc1_1 (linear)`, `_1 (Linear module 1)`: a loaded file keeps no source lines to point at."""
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__} module {node.target})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def inspect_file(args: argparse.Namespace) -> int:
    if args.input_shape:
        _input_shape(args.input_shape)  # before the file is read
    gm = _load(args.file)
    table = summary(gm, _example(gm, args))  # MACs need shapes, which a file does not store
    size = Path(args.file).stat().st_size
    print(f"{args.file}: {size} bytes on disk; {table.totals['params']} parameters "
          f"({table.totals['dense_bytes']} bytes in fp32, {table.totals['dense_bytes'] / size:.1f}x the file)")
    print()
    print(table.to_text(with_history=False))
    print("\nper-layer bytes:")
    print(_per_layer_bytes(table.rows))
    print("\npasses:")
    print(table.history or "(none)")
    return 0


def report_file(args: argparse.Namespace) -> int:
    """The HTML report with its pictures and the Markdown beside it (only the Markdown with --markdown)."""
    if args.input_shape:
        _input_shape(args.input_shape)  # before the file is read
    if args.sensitivity == "":
        check_layers_pattern(args)  # likewise
    suffix = ".md" if args.markdown else ".html"
    out = Path(args.out) if args.out else Path(args.file).with_suffix(suffix)
    if out.suffix.lower() != suffix:
        raise ConfigError(f"report --out must end in {suffix}{' (with --markdown)' if args.markdown else ''}, "
                          f"got {out.name!r}")
    for written in {out, out.with_suffix(".md")}:  # the Markdown is written beside the page
        not_the_input(written, args.file, "report output")
    gm = _load(args.file)
    example = _example(gm, args)
    reference = _load(args.reference) if args.reference else None
    facts = {"file": f"{Path(args.file).name}, {Path(args.file).stat().st_size} bytes on disk"}
    table = _sensitivity(gm, args)
    files = write_report(gm, out, title=f"Report of {Path(args.file).name}", reference=reference,
                         example_inputs=example, facts=facts, max_nodes=args.max_nodes, sensitivity=table)
    if files.html is not None:
        print(f"{files.html}: HTML report, {files.html.stat().st_size} bytes, {files.pictures} pictures")
    print(f"{files.markdown}: Markdown report, {files.markdown.stat().st_size} bytes")
    return 0


def _sensitivity(gm, args: argparse.Namespace) -> SensitivityTable | None:
    """--sensitivity TABLE.json: the saved table; --sensitivity alone: swept now on the file's own weights
    (decoded to dense: masks, codebooks and encodings folded in), each layer pruned further alone."""
    if args.sensitivity is None:
        return None
    if args.sensitivity:
        return SensitivityTable.load(args.sensitivity)
    with torch_threads(1):
        data = sweep_data(args)
        return sweep(decode(gm), data, args)


def decode_file(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # the suffix chooses the format: any other would be written as a .fxc file under a misleading name
    if out.suffix.lower() not in (".fxc", *STATE_DICT_SUFFIXES):
        raise ConfigError(f"decode OUT must end in .fxc (a dense fxcompress file) or "
                          f"{' / '.join(STATE_DICT_SUFFIXES)} (a state dict), got {out.name!r}")
    not_the_input(out, args.file, "decode OUT")
    dense = decode(_load(args.file))
    if out.suffix.lower() in STATE_DICT_SUFFIXES:
        torch.save(dense.state_dict(), out)
        what = "state dict"
    else:
        save(dense, out)
        what = "dense fxcompress file"
    print(f"{out}: {what}, {out.stat().st_size} bytes")
    return 0


def _input_shape(text: str | None) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in (text or "").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ConfigError(f"--input-shape must be positive sizes such as 1,1,28,28, got {text!r}")
    return shape


def _npz(form: str) -> Callable[[object, Path, argparse.Namespace], None]:
    def write(gm, out: Path, args) -> None:
        arrays = {f"{layer}.{key}": np.asarray(value) for layer, entry in sparse_arrays(gm, form).items()
                  for key, value in entry.items()}
        with open(out, "wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, **arrays)
    return write


# format -> (writer(gm, out, args), default suffix)
EXPORTS: dict[str, tuple[Callable, str]] = {
    "json": (lambda gm, out, args: to_json(gm, out, integer=args.integer), ".json"),
    "csr": (_npz("csr"), ".csr.npz"),
    "coo": (_npz("coo"), ".coo.npz"),
    "onnx": (lambda gm, out, args: to_onnx(gm, out, _onnx_inputs(gm, args), dynamic_axes=_dynamic_axes(args)),
             ".onnx"),
}


def _dynamic_axes(args: argparse.Namespace) -> dict[str, dict[int, str]] | None:
    """--dynamic-axis INPUT:AXIS:NAME (repeatable) as to_onnx's dynamic_axes."""
    axes: dict[str, dict[int, str]] = {}
    for given in args.dynamic_axis or []:
        parts = given.split(":")
        if len(parts) != 3 or not parts[0] or not parts[2] or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"--dynamic-axis {given!r}: give INPUT:AXIS:NAME, such as input_ids:1:length")
        axes.setdefault(parts[0], {})[int(parts[1])] = parts[2]
    return axes or None


def _onnx_inputs(gm, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """--input-shape as one float input, or else zeros of the inputs the file records (shape and dtype: a
    language model's token ids stay integers)."""
    if args.input_shape:
        return (torch.zeros(_input_shape(args.input_shape)),)
    metas = [n.meta.get("tensor_meta") for n in gm.graph.nodes if n.op == "placeholder"]
    if not metas or not all(isinstance(m, TensorMetadata) for m in metas):
        raise ConfigError(f"{args.file} records no input shapes (saved without example inputs, or by format "
                          "version 1): give --input-shape, such as 1,1,28,28")
    return tuple(torch.zeros(m.shape, dtype=m.dtype) for m in metas)


# the options each format reads: another format would ignore them, so they are refused
FORMAT_OPTIONS = {"--integer": ("integer", ("json",)), "--input-shape": ("input_shape", ("onnx",)),
                  "--dynamic-axis": ("dynamic_axis", ("onnx",))}


def export_file(args: argparse.Namespace) -> int:
    write, suffix = EXPORTS[args.format]
    for option, (key, formats) in FORMAT_OPTIONS.items():
        if getattr(args, key) not in (None, False) and args.format not in formats:
            raise ConfigError(f"export {option} applies to --format {' / '.join(formats)} only; "
                              f"--format {args.format} would ignore it")
    if args.input_shape is not None:
        _input_shape(args.input_shape)  # before the file is read
    if args.format == "onnx":
        _dynamic_axes(args)  # likewise
    out = Path(args.out) if args.out else Path(args.file).with_suffix(suffix)
    not_the_input(out, args.file, "export --out")
    gm = _load(args.file)
    if args.format == "onnx":
        _example(gm, args)  # a shape the model cannot take, named here rather than deep in the export
    write(gm, out, args)
    print(f"{out}: {args.format}, {out.stat().st_size} bytes")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("inspect", help="summary, per-layer bytes and pass history of a .fxc file",
                                 description="Print the summary table, the bytes of every layer's streams and "
                                             "the pass history of a saved model.")
    parser.add_argument("file", help="a file written by fxcompress.save")
    parser.add_argument("--input-shape", help="an input's shape, e.g. 1,1,28,28, to count MACs")
    parser.set_defaults(handler=inspect_file)

    parser = commands.add_parser("report", help="write a .fxc file's HTML report (pictures) and its Markdown",
                                 description="Write a self-contained HTML report (summary, bytes and sparsity per "
                                             "layer, weight histograms with centroids, pass history, graph) and "
                                             "the same tables as Markdown beside it; pictures need matplotlib.")
    parser.add_argument("file", help="a file written by fxcompress.save")
    parser.add_argument("--out", help="the report (default: FILE with .html, or .md with --markdown)")
    parser.add_argument("--markdown", action="store_true", help="only the Markdown tables, no HTML")
    parser.add_argument("--reference", help="a .fxc file holding the weights before quantization (the "
                                            "fake-quant model of an encoded FILE) for the histograms")
    parser.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES,
                        help="draw modules collapsed when the graph has more boxes than this")
    parser.add_argument("--input-shape", help="an input's shape, e.g. 1,1,28,28, to count MACs")
    parser.add_argument("--sensitivity", nargs="?", const="", metavar="TABLE.json",
                        help="add sensitivity curves: read TABLE.json (fxcompress sensitivity --out), or with no "
                             "value sweep the file's own weights on --data (each layer pruned further alone)")
    add_sweep_arguments(parser)
    parser.set_defaults(handler=report_file)

    parser = commands.add_parser("decode", help="write the dense model of a .fxc file", description=__doc__)
    parser.add_argument("file", help="a file written by fxcompress.save")
    parser.add_argument("out", help="OUT.fxc (dense fxcompress file) or OUT.pt / OUT.pth (state dict)")
    parser.set_defaults(handler=decode_file)

    parser = commands.add_parser("export", help="export a .fxc file's weights (json, csr, coo) or model (onnx)",
                                 description="json: per-layer float weights (or codes with --integer); csr / coo: "
                                             "per-layer sparse arrays in one .npz (LAYER.indptr, LAYER.indices, "
                                             "LAYER.values, LAYER.shape); onnx: the decoded model (onnx extra).")
    parser.add_argument("file", help="a file written by fxcompress.save")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTS))
    parser.add_argument("--out", help="output path (default: FILE with the format's suffix)")
    parser.add_argument("--integer", action="store_true", help="json: integer codes with codebook or scale")
    parser.add_argument("--input-shape", help="onnx: the example input's shape, e.g. 1,1,28,28 (default: the "
                                              "inputs the file records)")
    parser.add_argument("--dynamic-axis", action="append", metavar="INPUT:AXIS:NAME",
                        help="onnx: one more symbolic axis besides the batch, e.g. input_ids:1:length (repeatable)")
    parser.set_defaults(handler=export_file)
