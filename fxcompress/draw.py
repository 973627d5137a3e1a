"""draw(gm, path): a picture of the graph with the nodes that passes created or changed marked."""
from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
from torch.fx import GraphModule

from .errors import ConfigError, MissingDependencyError
from .history import history

STATUS_COLOURS = {"original": "#d9d9d9", "changed": "#f4b942", "created": "#5fa8d3"}


def _label(node) -> str:
    if node.op in ("call_module", "get_attr"):
        return f"{node.name}\n{node.target}"
    if node.op in ("call_function", "call_method"):
        return f"{node.name}\n{getattr(node.target, '__name__', node.target)}"
    return node.name


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph; node attributes: op, target, label, status."""
    created, changed = set(), set()
    for record in history(gm):
        created |= set(record.nodes_created)
        changed |= set(record.nodes_changed)
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        status = "created" if node.name in created else "changed" if node.name in changed else "original"
        graph.add_node(node.name, op=node.op, target=str(node.target), label=_label(node), status=status)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _layered_positions(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """Top-to-bottom layout by topological generation (inputs at the top)."""
    positions = {}
    for depth, generation in enumerate(nx.topological_generations(graph)):
        for i, name in enumerate(sorted(generation)):
            positions[name] = (i - (len(generation) - 1) / 2, -depth)
    return positions


def _write_dot(graph: nx.DiGraph, path: Path) -> None:
    lines = ["digraph fxcompress {", '  node [shape=box, style=filled, fontsize=10];']
    for name, data in graph.nodes(data=True):
        label = data["label"].replace('"', "'").replace("\n", "\\n")
        lines.append(f'  "{name}" [label="{label}", fillcolor="{STATUS_COLOURS[data["status"]]}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def draw(gm: GraphModule, path: str | os.PathLike) -> Path:
    """Draw `gm` to `path` (.svg, .png or .pdf with matplotlib; .dot as Graphviz text, no extra needed).

    Nodes created by passes are blue, nodes changed by passes orange, the rest grey.
    """
    path = Path(path)
    graph = to_networkx(gm)
    suffix = path.suffix.lower()
    if suffix == ".dot":
        _write_dot(graph, path)
        return path
    if suffix not in (".svg", ".png", ".pdf"):
        raise ConfigError(f"draw.path must end in .svg, .png, .pdf or .dot, got {path.name!r}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("draw() needs matplotlib for images: pip install 'fxcompress[draw]' "
                                     "(or draw to a .dot file)") from exc
    positions = _layered_positions(graph)
    widest = max(abs(x) for x, _ in positions.values()) * 2 + 1
    deepest = 1 - min(y for _, y in positions.values())
    width, height = max(6.0, 2.2 * widest), max(4.0, 0.9 * deepest)
    fig, ax = plt.subplots(figsize=(min(width, 60), min(height, 200)))
    colours = [STATUS_COLOURS[graph.nodes[n]["status"]] for n in graph.nodes]
    nx.draw_networkx_edges(graph, positions, ax=ax, arrows=True, arrowsize=8, edge_color="#888888")
    nx.draw_networkx_nodes(graph, positions, ax=ax, node_color=colours, node_shape="s", node_size=900)
    nx.draw_networkx_labels(graph, positions, {n: graph.nodes[n]["label"] for n in graph.nodes}, ax=ax, font_size=6)
    handles = [plt.Line2D([], [], marker="s", linestyle="", color=c, label=s) for s, c in STATUS_COLOURS.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
