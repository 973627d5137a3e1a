"""Run-time kernels for lowered layers, and choosing among them by measurement."""
from .timing import KernelChoice, choose_kernel, median_ms

__all__ = ["KernelChoice", "choose_kernel", "median_ms"]
