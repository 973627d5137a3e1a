"""Errors about a node name the user's module path and source line, for fx-traced and exported graphs
alike: a pass that breaks a node the user wrote, or a node it added next to one."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import VerificationError
from fxcompress.layers import find_layers, insert_on_weight
from fxcompress.pass_base import Pass, PassResult

FILE = r"test_errors_name_source\.py:\d+"
RELU_LINE = re.escape("h = torch.relu(self.fc(x))")
HEAD_LINE = re.escape("return self.head(self.block(x))")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return h * 2


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(x))


def _relu(gm):
    return next(n for n in gm.graph.nodes if n.target in (torch.relu, F.relu))


@dataclass(frozen=True, kw_only=True)
class Break(Pass):
    """Breaks the graph in a chosen way."""

    how: str

    def run(self, gm, ctx):
        if self.how == "user_node":  # the user's relu now reshapes 16 values into 5
            relu = _relu(gm)
            relu.target, relu.args = torch.reshape, (relu.args[0], (5,))
        elif self.how == "added_node":  # a reshape the pass adds on block.fc's weight chain cannot fit
            layer = next(layer for layer in find_layers(gm) if layer.name == "block.fc")
            insert_on_weight(gm, layer, lambda g, w: g.call_function(torch.reshape, (w, (5,))))
        elif self.how == "output_shape":  # the head's output is flattened by a new node
            out = next(n for n in gm.graph.nodes if n.op == "output")
            value = out.args[0]
            with gm.graph.inserting_before(out):
                out.replace_input_with(value, gm.graph.call_function(torch.flatten, (value,)))
        elif self.how == "crash":  # a bug of the pass, met while it handles the user's relu
            for node in gm.graph.nodes:
                if node.target in (torch.relu, F.relu):
                    raise IndexError("tuple index out of range")
        elif self.how == "silent":  # rewrites the user's relu but reports no change
            _relu(gm).target = torch.sigmoid
            return PassResult(changed=False)
        return PassResult(changed=True)


@pytest.fixture(params=["fx", "export"])
def frontend(request):
    return request.param


def _compile(how, frontend, verify=True):
    with pytest.raises(VerificationError) as info:
        fxcompress.compile(Model().eval(), [Break(how=how)], torch.randn(2, 8), frontend=frontend, verify=verify)
    return str(info.value)


def test_a_failing_node_the_user_wrote_is_named_by_module_file_and_line(frontend):
    message = _compile("user_node", frontend)
    assert re.search(rf"forward pass failed at node %\w+ .*\(module 'block' \(Block\) at {FILE}: {RELU_LINE}\)",
                     message), message


def test_a_failing_node_a_pass_added_is_placed_next_to_the_users_line(frontend):
    message = _compile("added_node", frontend)
    assert re.search(rf"forward pass failed at node %reshape .*\(a node added by a pass, next to module 'block.fc' "
                     rf"\(Linear\) at {FILE}: {RELU_LINE}\)", message), message


def test_a_shape_propagation_failure_names_the_users_line(frontend):
    message = _compile("user_node", frontend, verify=False)  # no forward check: the shape step finds it
    assert re.search(rf"shape propagation failed at node .*module 'block' \(Block\) at {FILE}: {RELU_LINE}",
                     message), message


def test_changed_outputs_name_the_output_node_and_its_line(frontend):
    message = _compile("output_shape", frontend)
    assert "outputs changed" in message
    assert re.search(rf"output 0 flatten: a node added by a pass, next to module 'head' \(Linear\) at {FILE}: "
                     rf"{HEAD_LINE}", message), message


def test_a_pass_that_crashes_names_the_node_it_was_handling(frontend):
    message = _compile("crash", frontend)
    assert re.search(rf"raised IndexError while handling node %\w+ .*\(module 'block' \(Block\) at {FILE}: "
                     rf"{RELU_LINE}\): tuple index out of range", message), message


def test_a_pass_that_hides_a_rewrite_is_told_which_users_line_it_touched(frontend):
    message = _compile("silent", frontend)
    assert re.search(rf"reported changed=False but rewrote nodes .*module 'block' \(Block\) at {FILE}: {RELU_LINE}",
                     message), message


def test_a_graph_module_without_source_lines_still_names_module_paths():
    """A graph traced elsewhere may carry no source lines: the message still names the module."""
    gm = torch.fx.symbolic_trace(Model().eval())  # torch.fx's own tracer records module paths, no lines
    with pytest.raises(VerificationError, match=r"forward pass failed at node %relu .*\(module 'block' \(Block\)\): "
                                                r"RuntimeError: shape '\[5\]' is invalid"):
        fxcompress.compile(gm, [Break(how="user_node")], torch.randn(2, 8))
