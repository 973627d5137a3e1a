"""Looking at a model before compiling it: `channel_graph(model, inputs)` shows the channel groups
PruneChannels would see, and why any are frozen, without changing anything."""
from __future__ import annotations

from .channels.graph import ChannelGraph
from .compile import _as_tuple, _to_graph
from .pass_base import PassContext


def channel_graph(model, example_inputs, *, leaf_modules=(), concrete_args=None,
                  attention: str = "head_dims") -> ChannelGraph:
    """Trace `model` (an nn.Module, GraphModule, ExportedProgram or its `.module()`, as compile takes
    them) and return its ChannelGraph, changing nothing:
    `print(channel_graph(model, (x,)))` lists the coupled groups and why any are frozen.
    `attention`: "head_dims" or "heads", as in PruneChannels."""
    inputs = _as_tuple(example_inputs)
    gm = _to_graph(model, inputs, "auto", True, leaf_modules, concrete_args)  # in place: nothing changes
    return PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph, attention=attention)
