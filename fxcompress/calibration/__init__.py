"""Calibration for language-model compression: sequential block-by-block statistics, the damped
inverse Hessian, the second-order sweep that SparseGPT and GPTQ share, and the masks chosen from
calibration data (Wanda, OWL, N:M), which build on the pruning primitives below this room."""
from .hessian import DampedInverse, InputStats, damped_inverse
from .masks import calibrated_masks, check_mask_config, keep_for, needs_calibration, select_keep
from .second_order import output_error, sweep
from .sequential import Group, WalkReport, plan_blocks, walk

__all__ = ["DampedInverse", "Group", "InputStats", "WalkReport", "calibrated_masks", "check_mask_config",
           "damped_inverse", "keep_for", "needs_calibration", "output_error", "plan_blocks", "select_keep", "sweep",
           "walk"]
