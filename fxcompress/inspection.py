"""Looking at a model before compiling it: `channel_graph(model, inputs)` shows the channel groups
PruneChannels would see, and why any are frozen, without changing anything."""
from __future__ import annotations

from torch.fx import GraphModule

from .channels.graph import ChannelGraph
from .compile import _as_tuple
from .pass_base import PassContext
from .tracing import trace


def channel_graph(model, example_inputs, *, leaf_modules=(), concrete_args=None,
                  attention: str = "head_dims") -> ChannelGraph:
    """Trace `model` (an nn.Module or GraphModule) and return its ChannelGraph, changing nothing:
    `print(channel_graph(model, (x,)))` lists the coupled groups and why any are frozen.
    `attention`: "head_dims" or "heads", as in PruneChannels."""
    gm = model if isinstance(model, GraphModule) else trace(model, leaf_modules=leaf_modules,
                                                            concrete_args=concrete_args)
    return PassContext(example_inputs=_as_tuple(example_inputs), gm=gm).get(ChannelGraph, attention=attention)
