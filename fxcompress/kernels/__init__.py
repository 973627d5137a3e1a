"""Run-time kernels for lowered layers, and choosing among them by measurement."""
from .dynamic import DynamicInt8Embedding, DynamicInt8Linear
from .sparse import SparseLayer, remeasure
from .timing import KernelChoice, choose_kernel, median_ms
from .weight_only import WeightOnlyEmbedding, WeightOnlyLinear

__all__ = ["DynamicInt8Embedding", "DynamicInt8Linear", "KernelChoice", "SparseLayer", "WeightOnlyEmbedding",
           "WeightOnlyLinear", "choose_kernel", "median_ms", "remeasure"]
