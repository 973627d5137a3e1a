"""Zeroed-channel equivalence, shared by the pruning, random-model and export tests: zero the
channels PruneChannels would remove, then the pruned model must equal the zeroed one."""
import operator

import numpy as np
import torch
from torch import nn

from fxcompress.channels import ChannelGraph
from fxcompress.channels.select import layer_units, lowest, removal_count


def pick_half(cg: ChannelGraph, seed: int = 0) -> np.ndarray:
    """A random half of every layer's prunable channels, as the pass would count it (bool per class)."""
    removed = np.zeros(cg.labels.max() + 1, dtype=bool)
    scores = np.random.default_rng(seed).random(len(removed))
    for g in cg.prunable_groups():
        for unit in layer_units(cg, g):
            if len(unit.prunable):
                removed[lowest(unit, scores, removal_count(unit, 0.5, 1, 1), cg, 1)] = True
    return removed


def zero_classes(gm: nn.Module, cg: ChannelGraph, removed: np.ndarray) -> None:
    """Zero every parameter slice of the removed classes: filters, biases, BN shift and scale."""
    with torch.no_grad():
        for (name, dim), ids in cg.slots.items():
            positions = np.flatnonzero(removed[cg.labels[ids]])
            if len(positions):
                operator.attrgetter(name)(gm).index_fill_(dim, torch.as_tensor(positions), 0.0)
