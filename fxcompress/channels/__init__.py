"""Channel pruning, below the PruneChannels pass: the dependency analysis (`graph`), which channels
to remove (`select`), removing them (`surgery`), and the least-squares refit of the layers that read
them (`capture` of calibration features, `refit`). Nothing here imports a pass."""
from .graph import ATTENTION_MODES, ChannelGraph, ChannelGroup

__all__ = ["ATTENTION_MODES", "ChannelGraph", "ChannelGroup"]
