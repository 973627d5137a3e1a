"""The channel dependency analysis: which channels of which tensors must shrink together.

`dependencies` (ChannelGraph, its groups), `walk` (one pass over the graph applying op rules),
`tensor_rules` / `layer_rules` (the rules), `ops` (the tables mapping each op to its rule).
"""
from .dependencies import ATTENTION_MODES, ChannelGraph, ChannelGroup

__all__ = ["ATTENTION_MODES", "ChannelGraph", "ChannelGroup"]
