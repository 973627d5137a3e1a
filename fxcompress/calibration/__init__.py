"""Calibration for language-model compression: sequential block-by-block statistics, the damped
inverse Hessian, and the second-order sweep that SparseGPT and GPTQ share."""
from .hessian import DampedInverse, InputStats, damped_inverse
from .second_order import output_error, sweep
from .sequential import Group, WalkReport, plan_blocks, walk

__all__ = ["DampedInverse", "Group", "InputStats", "WalkReport", "damped_inverse", "output_error", "plan_blocks",
           "sweep", "walk"]
