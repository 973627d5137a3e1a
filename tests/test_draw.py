import operator
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.draw import STATUS_COLOURS, layout, to_svg
from fxcompress.errors import ConfigError
from fxcompress.layers import find_layers, insert_on_weight
from fxcompress.pass_base import Pass, PassResult
from fxcompress.passes import InsertFakeQuant, InsertMasks
from fxcompress.zoo import LeNet300100, ResNetSmall


@dataclass(frozen=True, kw_only=True)
class HalveFirst(Pass):
    def run(self, gm, ctx):
        insert_on_weight(gm, find_layers(gm)[0], lambda g, w: g.call_function(operator.mul, (w, 0.5)))
        return PassResult(changed=True)


@pytest.fixture(scope="module")
def compiled():  # read, never changed, by the tests that draw it
    return fxcompress.compile(LeNet300100().eval(), [HalveFirst()], example_inputs=torch.randn(1, 784))


def test_graph_marks_created_nodes(compiled):
    graph = fxcompress.to_networkx(compiled)
    mul = next(n for n, d in graph.nodes(data=True) if d["target"] == str(operator.mul))
    assert graph.nodes[mul]["status"] == "created"
    assert graph.nodes["x"]["status"] == "original"
    assert graph.number_of_nodes() == len(compiled.graph.nodes)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".dot"])
def test_draw_writes_a_picture(compiled, tmp_path, suffix):
    path = fxcompress.draw(compiled, tmp_path / f"graph{suffix}")
    data = path.read_bytes()
    assert len(data) > 100
    if suffix == ".png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    elif suffix == ".svg":
        assert b"<svg" in data[:1000]
    else:
        assert data.startswith(b"digraph") and b"#5fa8d3" in data  # the created node's colour


def test_bad_suffix(compiled, tmp_path):
    with pytest.raises(ConfigError, match="draw.path"):
        fxcompress.draw(compiled, tmp_path / "graph.txt")


# The readable view: layout() places every box; the SVG and the PNG draw that layout.

@pytest.fixture(scope="module")
def lenet_chain():
    """LeNet-300-100 with masks and k-means fake-quant: each layer has a weight chain of four nodes and a bias.
    On 64 inputs, not 784: the same nodes and labels, and k-means clusters a tenth of the weights."""
    return fxcompress.compile(LeNet300100(in_features=64).eval(),
                              [InsertMasks(sparsity=0.9), InsertFakeQuant(bits=5, method="kmeans")],
                              example_inputs=torch.randn(1, 64))


@pytest.fixture(scope="module")
def resnet():
    # 8x8 images: the same graph (the net pools adaptively) at a sixteenth of the forward passes' work
    return fxcompress.compile(ResNetSmall().eval(), [InsertMasks(sparsity=0.5)], example_inputs=torch.randn(1, 3, 8, 8))


def _all_boxes(plan):
    return [b for level in plan.ranks for block in level
            for b in (block.host, *(c for column in block.columns for c in column)) if b.lines]


def _overlap(a, b) -> bool:
    return a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height


@pytest.mark.parametrize("model", ["lenet_chain", "resnet"])
def test_no_two_boxes_overlap_and_every_node_is_drawn_once(model, request):
    gm = request.getfixturevalue(model)
    plan = layout(gm)
    boxes = _all_boxes(plan)
    assert sorted(b.key for b in boxes) == sorted(n.name for n in gm.graph.nodes)
    assert not [(a.key, b.key) for i, a in enumerate(boxes) for b in boxes[i + 1:] if _overlap(a, b)]
    assert len(plan.edges) == sum(len(n.all_input_nodes) for n in gm.graph.nodes)  # every edge, once


def test_weight_chains_sit_beside_the_layer_they_feed(lenet_chain):
    plan = layout(lenet_chain)
    blocks = {block.host.key: block for level in plan.ranks for block in level}
    for layer in find_layers(lenet_chain):
        block = blocks[layer.node]
        side = {b.lines[0] for column in block.columns for b in column}
        assert side == {"weight", "weight_mask", "bias", "weight_quant"} | {next(
            b.lines[0] for column in block.columns for b in column if b.lines[0].startswith("mul"))}
        for column in block.columns:
            for box in column:  # left of the layer, within its row: not in a top row of weights
                assert box.x + box.width < block.host.x and abs(box.y - block.host.y) < 3 * box.height
        assert block.host.lines[0] == layer.name and "5 bits" in block.host.lines[-1]
        assert "90% sparse" in block.host.lines[-1]


def test_labels_are_not_repeated_and_text_is_readable(lenet_chain):
    boxes = _all_boxes(layout(lenet_chain))
    assert all(len(set(b.lines)) == len(b.lines) for b in boxes)
    relu = next(b for b in boxes if b.key == "relu")
    assert relu.lines == ["relu", "-> 1x300"]  # not "relu / relu"
    svg = to_svg(lenet_chain)
    sizes = [float(s) for s in re.findall(r'font-size="([\d.]+)"', svg)]
    assert sizes and min(sizes) >= 11  # readable at 100% zoom
    paths = re.findall(r"<path d=[^>]*>", svg.partition("</defs>")[2])  # after the arrowhead marker
    assert len(paths) == sum(len(n.all_input_nodes) for n in lenet_chain.graph.nodes)
    assert all('marker-end="url(#arrow)"' in p for p in paths)  # every edge has its arrowhead
    assert STATUS_COLOURS["created"] in svg and STATUS_COLOURS["changed"] in svg


def test_residual_edges_run_clear_of_the_boxes(resnet):
    plan = layout(resnet)
    boxes = _all_boxes(plan)
    skips = [(source, points) for source, points, target, style in plan.edges if style == "data" and points]
    assert len(skips) >= 4  # the identity shortcuts of the four blocks skip ranks
    for source, points in skips:
        for x, y in points:  # each waypoint is in a column of its own
            assert not any(b.x - 2 <= x <= b.x + b.width + 2 and b.y <= y <= b.y + b.height for b in boxes)


def test_large_graphs_collapse_whole_modules(resnet):
    plan = layout(resnet, max_nodes=12)
    hosts = [block.host for level in plan.ranks for block in level if block.host.lines]
    assert len(hosts) <= 12
    titles = {b.lines[0] for b in hosts}
    assert {"layer1.0", "layer1.1", "layer2.0", "layer2.1"} <= titles
    block = next(b for b in hosts if b.lines[0] == "layer2.0")
    assert block.lines[1].startswith("BasicBlock") and "3 layers" in block.lines[2]  # conv1, conv2, shortcut
    with pytest.raises(ConfigError, match="draw.max_nodes"):
        layout(resnet, max_nodes=0)


def test_pdf_through_matplotlib(compiled, tmp_path):
    # the small graph with one weight chain: PDF's text embedding made the four-chain LeNet cost 4x as much
    pytest.importorskip("matplotlib")
    assert fxcompress.draw(compiled, tmp_path / "g.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_bert_from_the_export_front_end_collapses_into_its_layers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    gm = fxcompress.compile(transformers.BertModel(config).eval(), [], (torch.randint(0, 64, (1, 8)),),
                            frontend="export")
    plan = layout(gm, max_nodes=12)
    titles = [block.host.lines[0] for level in plan.ranks for block in level if block.host.lines]
    assert len(titles) <= 12 and {"encoder.layer.0", "encoder.layer.1"} <= set(titles)
    assert not any(t.startswith("encoder.layer.0.") for t in titles)  # the layer's inside is one box


class SizeReadTwice(nn.Module):
    """The batch size read once, used by a layer's output and by a table built for a later add."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        n = x.size(0)
        positions = torch.arange(n).float()[:, None]  # drawn beside the add that reads it
        y = self.fc1(x) * n  # the size's first reader on the data path: it is drawn beside this
        return self.fc2(y) + positions


def test_a_size_read_by_two_hosts_is_drawn_beside_the_first():
    gm = fxcompress.compile(SizeReadTwice().eval(), [], (torch.randn(3, 4),))
    plan = layout(gm)
    titles = [block.host.lines[0] for level in plan.ranks for block in level if block.host.lines]
    assert "size" not in titles and "arange" not in titles  # sizes and what they build are no data path
    beside = {block.host.lines[0]: [[b.key for b in column] for column in block.columns]
              for level in plan.ranks for block in level}
    assert beside["mul"] == [["size"]] and ["arange"] in beside["add"]
    assert "<svg" in to_svg(gm)
