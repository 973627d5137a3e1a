"""Run-time kernels for lowered layers, and choosing among them by measurement."""
from .dynamic import DynamicInt8Linear
from .sparse import SparseLayer, remeasure
from .timing import KernelChoice, choose_kernel, median_ms
from .weight_only import WeightOnlyLinear

__all__ = ["DynamicInt8Linear", "KernelChoice", "SparseLayer", "WeightOnlyLinear", "choose_kernel", "median_ms",
           "remeasure"]
