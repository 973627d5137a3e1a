import operator
from dataclasses import dataclass

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.layers import find_layers, insert_on_weight
from fxcompress.pass_base import Pass, PassResult
from zoo import LeNet300100


@dataclass(frozen=True, kw_only=True)
class HalveFirst(Pass):
    def run(self, gm, ctx):
        insert_on_weight(gm, find_layers(gm)[0], lambda g, w: g.call_function(operator.mul, (w, 0.5)))
        return PassResult(changed=True)


@pytest.fixture
def compiled():
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
