"""draw(gm, path) and to_svg(gm): a readable picture of the graph, marking what passes created or changed.

The picture is a layered drawing of our own (no graphviz): the data flow runs top to bottom with
arrowheads; a layer's weight chain (get_attr -> mask -> fake-quant), and every other node that
depends on no input, sits in a row beside the layer it feeds instead of in one top row; an edge
that skips ranks (a residual) is routed through its own column so it never hides behind the main
chain. Each layer shows its output shape, weight shape, bits and sparsity. A graph with more than
`max_nodes` nodes on its data path is drawn with whole modules (a ResNet block, a BERT layer)
collapsed into one box each, at the deepest module level that fits.
"""
from __future__ import annotations

import html
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import ConfigError, MissingDependencyError
from .frontends.guards import check_input_shape
from .frontends.specialize import reads_shape
from .history import history
from .layers import find_layers
from .summary import Summary, summary

if TYPE_CHECKING:  # annotations only; each function that builds a graph imports networkx
    import networkx as nx

STATUS_COLOURS = {"original": "#d9d9d9", "changed": "#f4b942", "created": "#5fa8d3"}
SIDE_COLOURS = {"original": "#f2f2f2", "changed": "#fbe3b0", "created": "#cfe6f3"}  # lighter: weight chains
FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"
CHAR = {13: 7.9, 11: 6.7}  # monospace advance per character at each font size (px)
LINE, PAD, GAP, RANK_GAP, DUMMY = 16, 8, 26, 46, 14
DEFAULT_MAX_NODES = 120


@dataclass
class _Box:
    key: str
    lines: list[str]
    status: str
    tip: str
    side: bool = False
    x: float = 0.0  # left edge
    y: float = 0.0  # top edge
    span: float = 0.0  # a dummy's row height: an edge runs straight down through the row

    @property
    def width(self) -> float:
        sizes = [13] + [11] * (len(self.lines) - 1)
        return max(len(t) * CHAR[s] for t, s in zip(self.lines, sizes)) + 2 * PAD if self.lines else DUMMY

    @property
    def height(self) -> float:
        return len(self.lines) * LINE + PAD if self.lines else 1.0


@dataclass
class _Block:
    """One slot of a rank: a data-path box with its side nodes in columns to its left (or a dummy)."""

    host: _Box
    columns: list[list[_Box]] = field(default_factory=list)
    x: float = 0.0  # the host's centre

    def extent(self) -> tuple[float, float]:  # columns[0] is nearest the host
        """Width left of the host's centre and right of it."""
        left = sum(max(b.width for b in c) + GAP for c in self.columns)
        return left + self.host.width / 2, self.host.width / 2

    @property
    def height(self) -> float:
        tallest = max((sum(b.height + 8 for b in c) - 8 for c in self.columns), default=0)
        return max(self.host.height, tallest)


def _statuses(gm: GraphModule) -> tuple[dict[str, str], dict[str, str]]:
    """Each touched node's status and the passes that touched it, from the history."""
    status, by = {}, defaultdict(list)
    for record in history(gm):
        for name in record.nodes_changed:
            status.setdefault(name, "changed")
            by[name].append(f"changed by {record.name}")
        for name in record.nodes_created:
            status[name] = "created"
            by[name].append(f"created by {record.name}")
    return status, {k: "; ".join(v) for k, v in by.items()}


def _function_name(node: Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _shape(node: Node) -> str | None:
    meta = node.meta.get("tensor_meta")
    return "x".join(map(str, meta.shape)) if isinstance(meta, TensorMetadata) else None


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%" if value >= 0.01 or value == 0 else f"{100 * value:.1f}%"


def _layer_details(gm: GraphModule, table: Summary | None) -> dict[str, tuple[str, str]]:
    """node name -> (layer name, 'w SHAPE · B bits · S sparse') for every layer node (from `table`,
    the caller's summary of `gm` if it has one: on a large model the summary is the slow part)."""
    try:
        rows = {row["layer"]: row for row in (table or summary(gm)).rows}
    except (RuntimeError, ValueError, TypeError):  # a weight chain that cannot be evaluated: no details
        rows = {}
    found = {}
    for layer in find_layers(gm):
        row = rows.get(layer.name, {})
        parts = [f"w {'x'.join(map(str, row['weight_shape']))}"] if row.get("weight_shape") else []
        parts += [f"{row['bits']} bits"] if row.get("bits") and row["bits"] < 32 else []
        parts += [f"{_pct(row['sparsity'])} sparse"] if row.get("sparsity") else []
        found[layer.node] = (layer.name, " · ".join(parts))
    return found


def _lines(gm: GraphModule, node: Node, layer: tuple[str, str] | None) -> list[str]:
    """A main box's text: a title, what it computes (only when the title does not already say it),
    the output shape and, for a layer, its weight's shape, bits and sparsity."""
    if layer is not None:
        title, what = layer[0], _function_name(node) if node.op == "call_function" else type(
            gm.get_submodule(node.target)).__name__
    elif node.op == "call_module":
        title, what = node.target, type(gm.get_submodule(node.target)).__name__
    elif node.op in ("call_function", "call_method"):
        title, what = node.name, _function_name(node)
        if re.fullmatch(re.escape(what) + r"(_\d+)?", title):
            what = None  # "relu_1" already says relu
    else:
        title, what = node.name, {"placeholder": "input", "output": None}.get(node.op, node.op)
    shape = _shape(node) if node.op != "output" else None
    lines = [title] + ([what] if what and what != title else [])
    lines += [f"-> {shape}"] if shape else []
    return lines + ([layer[1]] if layer and layer[1] else [])


def _side_lines(gm: GraphModule, node: Node) -> list[str]:
    """A weight-chain box: the tensor or transform's own name, and its module type or function."""
    if node.op == "get_attr":
        return [node.target.rpartition(".")[2], _shape(node) or "constant"]
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        bits = getattr(module, "bits", None)
        return [node.target.rpartition(".")[2], type(module).__name__ + (f" {bits}b" if bits else "")]
    return [node.name] + ([] if node.name.startswith(_function_name(node)) else [_function_name(node)])


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph; node attributes: op, target, label, status, side (the
    data-path node it is drawn beside, None on the data path), module (the module path it runs in)."""
    import networkx as nx  # here, not at the top: `import fxcompress` skips networkx until a graph is drawn
    status, _ = _statuses(gm)
    graph = nx.DiGraph()
    data_path = _data_path(gm)
    hosts = _hosts(gm, data_path)
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op, target=str(node.target), label="\n".join(_plain_lines(node)),
                       status=status.get(node.name, "original"), side=hosts.get(node.name),
                       module=_module_path(node))
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _plain_lines(node: Node) -> list[str]:
    what = _function_name(node) if node.op.startswith("call_") else node.op
    return [node.name] if what == node.name or node.op == "output" else [node.name, what]


def _data_path(gm: GraphModule) -> set[str]:
    """The nodes that depend on a graph input's values (and the output): everything else is a constant
    chain. A node reading only an input's size (a free batch's `x.size(0)`, and the positions and masks
    built from it) is drawn beside the layer it feeds, as a constant is, and an input's shape check beside
    the input."""
    reached = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or (
                not reads_shape(node) and node.target is not check_input_shape
                and any(a.name in reached for a in node.all_input_nodes)):
            reached.add(node.name)
    return reached


def _hosts(gm: GraphModule, data_path: set[str]) -> dict[str, str]:
    """Each constant node -> the first data-path node it feeds (directly or through other constants);
    a constant that feeds nothing (dead code a front end left) sits beside the output."""
    hosts: dict[str, str] = {}
    output = next((n.name for n in gm.graph.nodes if n.op == "output"), None)
    for node in reversed(list(gm.graph.nodes)):
        if node.name in data_path:
            continue
        if node.target is check_input_shape:
            hosts[node.name] = node.args[0].name
            continue
        candidates = [u.name if u.name in data_path else hosts.get(u.name) for u in node.users]
        order = [c for c in candidates if c is not None]
        if order or output is not None:
            hosts[node.name] = min(order, key=_position(gm)) if order else output
    return hosts


def _position(gm: GraphModule):
    index = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return str(path[0] if isinstance(path, tuple) else path)
    return str(node.target) if node.op == "call_module" else ""


def _group_of(path: str, depth: int) -> str | None:
    parts = [p for p in path.split(".") if p] if path else []
    return ".".join(parts[:depth]) if len(parts) >= depth else None


def _enclose(graph: nx.DiGraph, main: list[str], group: dict[str, str]) -> None:
    """A node without a module path (a front end's translated op) joins the module all its inputs
    and users are in: it is that module's work, spelled without the module's name."""
    for _ in range(3):
        for n in main:
            if group[n] != n:
                continue
            around = {group.get(m) for m in (*graph.predecessors(n), *graph.successors(n)) if m in group}
            if len(around) == 1 and (only := around.pop()) not in graph:
                group[n] = only


def _collapse_depth(graph: nx.DiGraph, main: list[str], max_nodes: int) -> int | None:
    """The deepest module level at which the data path, modules collapsed, has at most `max_nodes` boxes."""
    if len(main) <= max_nodes:
        return None
    deepest = max((len(graph.nodes[n]["module"].split(".")) for n in main if graph.nodes[n]["module"]), default=0)
    best = 1
    for depth in range(1, deepest + 1):
        boxes = {_group_of(graph.nodes[n]["module"], depth) or n for n in main}
        if len(boxes) <= max_nodes:
            best = depth
    return best if deepest else None


def _groups(graph: nx.DiGraph, main: list[str], depth: int | None) -> dict[str, str]:
    """data-path node -> the box it is drawn in (itself, or its module at `depth`) keeping the
    collapsed graph acyclic: a module whose nodes interleave with others' stays expanded."""
    import networkx as nx  # here, not at the top: `import fxcompress` skips networkx until a graph is drawn
    group = {n: n for n in main}
    if depth is None:
        return group
    group.update({n: _group_of(graph.nodes[n]["module"], depth) or n for n in main})
    _enclose(graph, main, group)
    sizes = defaultdict(int)
    for box in group.values():
        sizes[box] += 1
    group.update({n: n for n in main if sizes[group[n]] == 1})  # a module of one node: the node itself
    while True:
        quotient = nx.DiGraph()
        quotient.add_nodes_from(set(group.values()))
        quotient.add_edges_from({(group[u], group[v]) for u, v in graph.subgraph(main).edges
                                 if group[u] != group[v]})
        tangled = {box for part in nx.strongly_connected_components(quotient) if len(part) > 1 for box in part}
        if not tangled:
            return group
        group.update({n: n for n in main if group[n] in tangled})


@dataclass
class _Layout:
    ranks: list[list[_Block]]
    edges: list[tuple[_Box, list[tuple[float, float]] | None, _Box, str]]  # source, waypoints, target, style
    width: float = 0.0
    height: float = 0.0


def _collapsed_box(gm: GraphModule, name: str, members: list[Node], status: dict[str, str],
                   layers: dict[str, tuple[str, str]]) -> _Box:
    kind = next((str(v[1].__name__ if isinstance(v[1], type) else v[1]).rpartition(".")[2]
                 for m in members for v in (m.meta.get("nn_module_stack") or {}).values()
                 if isinstance(v, tuple) and v[0] == name), "module")
    touched = sum(status.get(m.name, "original") != "original" for m in members)
    count = sum(m.name in layers for m in members)
    lines = [name, f"{kind} · {len(members)} ops", f"{count} layers" + (f" · {touched} touched" if touched else "")]
    shape = _shape(members[-1])
    lines += [f"-> {shape}"] if shape else []
    return _Box(name, lines, "changed" if touched else "original",
                f"{name} ({kind}): {len(members)} ops collapsed: " + ", ".join(m.name for m in members[:40]))


def _boxes(gm: GraphModule, max_nodes: int, table: Summary | None) -> tuple[dict[str, _Box], dict[str, str], nx.DiGraph]:
    """The data-path boxes (collapsed modules or nodes), each node's box, and the graph."""
    graph = to_networkx(gm)
    status, tips = _statuses(gm)
    layers = _layer_details(gm, table)
    nodes = {n.name: n for n in gm.graph.nodes}
    main = [n for n in nodes if graph.nodes[n]["side"] is None]
    group = _groups(graph, main, _collapse_depth(graph, main, max_nodes))
    boxes: dict[str, _Box] = {}
    for name in dict.fromkeys(group[n] for n in main):
        members = [nodes[n] for n in main if group[n] == name]
        if len(members) == 1 and members[0].name == name:
            node = members[0]
            tip = f"{node.op} {node.name}: {node.target}" + (f" ({tips[name]})" if name in tips else "")
            boxes[name] = _Box(name, _lines(gm, node, layers.get(name)), status.get(name, "original"), tip)
        else:
            boxes[name] = _collapsed_box(gm, name, members, status, layers)
    return boxes, group, graph


def _side_blocks(gm: GraphModule, graph: nx.DiGraph, boxes: dict[str, _Box], group: dict[str, str]
                 ) -> tuple[dict[str, _Block], dict[str, _Box]]:
    """A block per data-path box, with the side nodes of an expanded host in columns by chain depth."""
    status, tips = _statuses(gm)
    blocks = {name: _Block(box) for name, box in boxes.items()}
    side_boxes, column = {}, {}
    for node in reversed(list(gm.graph.nodes)):  # columns counted from the host: a bias sits right beside it
        host = graph.nodes[node.name]["side"]
        if host is None or group.get(host) != host:
            continue  # on the data path, or beside a collapsed module (its box counts it)
        # counted along users beside the same host: one beside another host (a size read by two layers) is
        # no step of this host's chain
        column[node.name] = 1 + max((column[u.name] for u in node.users
                                     if u.name in column and graph.nodes[u.name]["side"] == host), default=-1)
    upstream: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.name not in column:
            continue
        upstream[node.name] = 1 + max((upstream.get(a.name, 0) for a in node.all_input_nodes), default=0)
        host = graph.nodes[node.name]["side"]
        tip = f"{node.op} {node.name}: {node.target}" + (f" ({tips[node.name]})" if node.name in tips else "")
        # a constant that also feeds other boxes (a shared attention mask, a tied weight) says so
        # instead of sending edges across the whole picture
        others = sorted({group[u.name] for u in node.users if u.name in group and group[u.name] != host})
        lines = _side_lines(gm, node) + ([f"+ {len(others)} more users"] if others else [])
        tip += f"; also feeds {', '.join(others)}" if others else ""
        side_boxes[node.name] = _Box(node.name, lines, status.get(node.name, "original"), tip, True)
        columns = blocks[host].columns
        while len(columns) <= column[node.name]:
            columns.append([])
        columns[column[node.name]].append(side_boxes[node.name])
    for block in blocks.values():  # the longer chain (the weight's) on top, a bias below it
        for boxes_ in block.columns:
            boxes_.sort(key=lambda b: -upstream[b.key])
    return blocks, side_boxes


def _ranks(dag: nx.DiGraph) -> dict[str, int]:
    import networkx as nx  # here, not at the top: `import fxcompress` skips networkx until a graph is drawn
    rank = {}
    for name in nx.topological_sort(dag):
        rank[name] = 1 + max((rank[p] for p in dag.predecessors(name)), default=-1)
    return rank


def _with_dummies(dag: nx.DiGraph, rank: dict[str, int], blocks: dict[str, _Block]) -> dict[tuple, list[str]]:
    """A dummy block on every rank an edge skips (its own column); returns edge -> its dummies."""
    routes = {}
    for u, v in list(dag.edges):
        chain = []
        for r in range(rank[u] + 1, rank[v]):
            key = f"\0{u}->{v}@{r}"
            blocks[key], rank[key] = _Block(_Box(key, [], "original", "")), r
            chain.append(key)
        routes[(u, v)] = chain
    return routes


def _order(levels: list[list[str]], up: dict[str, list[str]], down: dict[str, list[str]]) -> None:
    """Barycentre ordering, a few sweeps down and up, to keep edges from crossing."""
    for sweep in range(6):
        rng = range(1, len(levels)) if sweep % 2 == 0 else range(len(levels) - 2, -1, -1)
        near = up if sweep % 2 == 0 else down
        for r in rng:
            other = levels[r - 1] if sweep % 2 == 0 else levels[r + 1]
            where = {k: i for i, k in enumerate(other)}
            current = {k: i for i, k in enumerate(levels[r])}
            def centre(k, where=where, current=current):
                xs = [where[n] for n in near[k] if n in where]
                return sum(xs) / len(xs) if xs else current[k]
            levels[r].sort(key=lambda k: (centre(k), current[k]))


def _place_x(levels: list[list[str]], blocks: dict[str, _Block], up: dict[str, list[str]],
             down: dict[str, list[str]]) -> None:
    """Each block's centre: pulled toward its neighbours' centres, kept in order without overlap."""
    for level in levels:
        right = 0.0
        for key in level:
            left, width = blocks[key].extent()
            blocks[key].x = right + left
            right = blocks[key].x + width + GAP
    for sweep in range(8):
        rng = range(1, len(levels)) if sweep % 2 == 0 else range(len(levels) - 2, -1, -1)
        for r in rng:
            near = up if sweep % 2 == 0 else down
            level = levels[r]
            wanted = []
            for key in level:
                xs = [blocks[n].x for n in near[key]]
                wanted.append(sum(xs) / len(xs) if xs else blocks[key].x)
            _pack(level, blocks, wanted)
    lowest = min(blocks[k].x - blocks[k].extent()[0] for level in levels for k in level)
    for block in blocks.values():
        block.x -= lowest - GAP


def _pack(level: list[str], blocks: dict[str, _Block], wanted: list[float]) -> None:
    """Place blocks at their wanted centres in order, pushing right where they would overlap, then
    shifting back left as far as the wanted positions allow (a cheap, stable compaction)."""
    xs = list(wanted)
    for i in range(1, len(level)):
        gap = blocks[level[i - 1]].extent()[1] + GAP + blocks[level[i]].extent()[0]
        xs[i] = max(xs[i], xs[i - 1] + gap)
    shift = (sum(xs) - sum(wanted)) / len(xs) if xs else 0.0
    for i in range(len(level)):
        xs[i] -= shift
    for i in range(len(level) - 2, -1, -1):
        gap = blocks[level[i]].extent()[1] + GAP + blocks[level[i + 1]].extent()[0]
        xs[i] = min(xs[i], xs[i + 1] - gap)
    for key, x in zip(level, xs):
        blocks[key].x = x


def _place_boxes(levels: list[list[str]], blocks: dict[str, _Block], top: float) -> float:
    """Rows top to bottom; a host at its block's centre, its side columns to its left. Returns the bottom."""
    y = top
    for level in levels:
        height = max(blocks[k].height for k in level)
        for key in level:
            block = blocks[key]
            block.host.x, block.host.y, block.host.span = block.x - block.host.width / 2, y, height
            right = block.host.x - GAP
            for column in block.columns:  # column 0 feeds the host
                widest = max(b.width for b in column)
                row_y = y
                for box in column:
                    box.x, box.y = right - widest + (widest - box.width), row_y
                    row_y += box.height + 8
                right -= widest + GAP
        y += height + RANK_GAP
    return y - RANK_GAP


def layout(gm: GraphModule, max_nodes: int = DEFAULT_MAX_NODES, table: Summary | None = None) -> _Layout:
    """Positions of every box and the route of every edge (see the module docstring)."""
    if max_nodes < 1:
        raise ConfigError(f"draw.max_nodes must be at least 1, got {max_nodes!r}")
    boxes, group, graph = _boxes(gm, max_nodes, table)
    blocks, side_boxes = _side_blocks(gm, graph, boxes, group)
    import networkx as nx  # here, not at the top: `import fxcompress` skips networkx until a graph is drawn
    dag = nx.DiGraph()
    dag.add_nodes_from(boxes)
    dag.add_edges_from({(group[u], group[v]) for u, v in graph.edges
                        if u in group and v in group and group[u] != group[v]})
    rank = _ranks(dag)
    routes = _with_dummies(dag, rank, blocks)
    up, down = defaultdict(list), defaultdict(list)
    for (u, v), chain in routes.items():
        path = [u, *chain, v]
        for a, b in zip(path, path[1:]):
            down[a].append(b)
            up[b].append(a)
    levels = [[] for _ in range(max(rank.values()) + 1)]
    for key in sorted(rank, key=lambda k: (k.startswith("\0"), list(blocks).index(k))):
        levels[rank[key]].append(key)
    _order(levels, up, down)
    _place_x(levels, blocks, up, down)
    bottom = _place_boxes(levels, blocks, top=60)
    edges = [(boxes[u], [p for d in chain for p in ((blocks[d].x, blocks[d].host.y),
                                                     (blocks[d].x, blocks[d].host.y + blocks[d].host.span))],
              boxes[v], "data")
             for (u, v), chain in routes.items()]
    edges += _side_edges(gm, graph, group, side_boxes, boxes)
    right = max(b.x + b.width for b in [*boxes.values(), *side_boxes.values()])
    return _Layout([[blocks[k] for k in level] for level in levels], edges, right + GAP, bottom + GAP)


def _side_edges(gm, graph, group, side_boxes, boxes) -> list:
    """Edges out of side nodes: into the next chain step or the host. Edges into one box enter at
    different heights, so that each arrowhead is seen."""
    edges, entering = [], defaultdict(int)
    for name, box in side_boxes.items():
        for user in graph.successors(name):
            if user in side_boxes:
                target, style = side_boxes[user], "side"
            elif user in group and group[user] == graph.nodes[name]["side"]:
                target, style = boxes[group[user]], "side"
            else:
                continue  # another box's input: the side box names it ("+ N more users")
            slot = entering[target.key]
            entering[target.key] += 1
            y = min(target.y + 9 + 11 * slot, target.y + target.height - 4)
            edges.append((box, [(target.x - 2, y)], target, style))
    return edges


EDGE_STYLES = {"data": 'stroke="#555" stroke-width="1.4"', "side": 'stroke="#8a8a8a" stroke-width="1.1"'}


def _edge_path(source: _Box, points: list[tuple[float, float]] | None, target: _Box, style: str) -> str:
    """A data edge leaves a box's bottom and enters the next one's top with vertical tangents; a side
    edge runs from a box's right to the next box's left with horizontal tangents."""
    if style == "data":
        start = (source.x + source.width / 2, source.y + source.height)
        stops = [*points, (target.x + target.width / 2, target.y - 2)]
        d = f"M{start[0]:.1f},{start[1]:.1f}"
        for (x0, y0), (x1, y1) in zip([start, *stops], stops):
            if x0 == x1:
                d += f" L{x1:.1f},{y1:.1f}"
            else:
                mid = (y0 + y1) / 2
                d += f" C{x0:.1f},{mid:.1f} {x1:.1f},{mid:.1f} {x1:.1f},{y1:.1f}"
    else:
        x0, y0 = source.x + source.width, source.y + source.height / 2
        x1, y1 = points[0]
        mid = (x0 + x1) / 2
        d = f"M{x0:.1f},{y0:.1f} C{mid:.1f},{y0:.1f} {mid:.1f},{y1:.1f} {x1:.1f},{y1:.1f}"
    return f'<path d="{d}" fill="none" {EDGE_STYLES[style]} marker-end="url(#arrow)"/>'


def _box_svg(box: _Box) -> str:
    fill = (SIDE_COLOURS if box.side else STATUS_COLOURS)[box.status]
    parts = [f'<g class="node{" side" if box.side else ""}"><title>{html.escape(box.tip)}</title>',
             f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" rx="5" '
             f'fill="{fill}" stroke="{"#999" if box.side else "#444"}"/>']
    for i, text in enumerate(box.lines):
        size, weight = (13, "bold") if i == 0 else (11, "normal")
        parts.append(f'<text x="{box.x + PAD:.1f}" y="{box.y + PAD / 2 + LINE * (i + 1) - 4:.1f}" '
                     f'font-size="{size}" font-weight="{weight}">{html.escape(text)}</text>')
    return "".join(parts) + "</g>"


def _legend() -> str:
    items = [("original", STATUS_COLOURS["original"]), ("changed by a pass", STATUS_COLOURS["changed"]),
             ("created by a pass", STATUS_COLOURS["created"])]
    parts, x = [], 10.0
    for text, colour in items:
        parts.append(f'<rect x="{x:.0f}" y="14" width="18" height="14" rx="3" fill="{colour}" stroke="#444"/>'
                     f'<text x="{x + 24:.0f}" y="26" font-size="13">{text}</text>')
        x += 40 + len(text) * CHAR[13]
    parts.append('<text x="10" y="48" font-size="11" fill="#555">weight chains (stored tensor -> mask -> '
                 'quantizer) beside the layer they feed; hover a box for details</text>')
    return "".join(parts)


def to_svg(gm: GraphModule, max_nodes: int = DEFAULT_MAX_NODES, table: Summary | None = None) -> str:
    """The graph as a self-contained SVG document (text at 11-13 px: readable at 100% zoom).
    `table`: summary(gm), if the caller has it already."""
    plan = layout(gm, max_nodes, table)
    width = max(plan.width, 760.0)
    body = [_edge_path(*edge) for edge in plan.edges]
    for level in plan.ranks:
        for block in level:
            if block.host.lines:
                body.append(_box_svg(block.host))
            body += [_box_svg(b) for column in block.columns for b in column]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{plan.height:.0f}" '
            f'viewBox="0 0 {width:.0f} {plan.height:.0f}" font-family="{FONT}" class="fxgraph">'
            '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
            f'<rect width="100%" height="100%" fill="white"/>')
    return "\n".join([head, _legend(), *body, "</svg>"]) + "\n"


def _write_dot(graph: nx.DiGraph, path: Path) -> None:
    lines = ["digraph fxcompress {", '  node [shape=box, style=filled, fontsize=10];']
    for name, data in graph.nodes(data=True):
        label = data["label"].replace('"', "'").replace("\n", "\\n")
        lines.append(f'  "{name}" [label="{label}", fillcolor="{STATUS_COLOURS[data["status"]]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def draw(gm: GraphModule, path: str | os.PathLike, max_nodes: int = DEFAULT_MAX_NODES) -> Path:
    """Draw `gm` to `path`: .svg (our own layered drawing, no extra needed), .png or .pdf (the same
    drawing through matplotlib, which needs the `draw` extra), or .dot (Graphviz text).

    Nodes created by passes are blue, nodes changed by passes orange, the rest grey.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dot":
        _write_dot(to_networkx(gm), path)
        return path
    if suffix not in (".svg", ".png", ".pdf"):
        raise ConfigError(f"draw.path must end in .svg, .png, .pdf or .dot, got {path.name!r}")
    if suffix == ".svg":
        path.write_text(to_svg(gm, max_nodes))
        return path
    _draw_matplotlib(layout(gm, max_nodes), path)
    return path


def _draw_matplotlib(plan: _Layout, path: Path) -> None:
    """The same layout as the SVG, through matplotlib (one pixel of the SVG is one point at 72 dpi)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    except ImportError as exc:
        raise MissingDependencyError("draw() needs matplotlib for .png / .pdf: pip install 'fxcompress[draw]' "
                                     "(or draw to .svg or .dot, which need nothing more)") from exc
    width, height = max(plan.width, 400.0), plan.height
    scale = min(1.0, 2 ** 15 / max(width, height))  # Agg's largest image side
    fig = plt.figure(figsize=(width * scale / 72, height * scale / 72), dpi=72 * 1.5)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    # patches go in with add_artist, not add_patch: the limits are fixed above, and add_patch's update of
    # the data limits walks every curve of every rounded box and arrow (a fifth of the drawing's time)
    for source, points, target, style in plan.edges:
        if style == "data":
            xy = [(source.x + source.width / 2, source.y + source.height), *(points or []),
                  (target.x + target.width / 2, target.y)]
        else:
            xy = [(source.x + source.width, source.y + source.height / 2), points[0]]
        ax.plot([p[0] for p in xy[:-1]], [p[1] for p in xy[:-1]], color="#555", lw=0.9 * scale)
        ax.add_artist(FancyArrowPatch(xy[-2], xy[-1], arrowstyle="-|>", mutation_scale=9 * scale, color="#555",
                                      lw=0.9 * scale))
    for box in [b for level in plan.ranks for block in level
                for b in (block.host, *(c for col in block.columns for c in col)) if b.lines]:
        fill = (SIDE_COLOURS if box.side else STATUS_COLOURS)[box.status]
        ax.add_artist(FancyBboxPatch((box.x, box.y), box.width, box.height, boxstyle="round,pad=0,rounding_size=4",
                                     facecolor=fill, edgecolor="#444", lw=0.8 * scale))
        for i, text in enumerate(box.lines):
            ax.text(box.x + PAD, box.y + PAD / 2 + LINE * (i + 1) - 4, text, family="monospace",
                    fontsize=(10 if i == 0 else 8.5) * scale, weight="bold" if i == 0 else "normal")
    fig.savefig(path)
    plt.close(fig)
