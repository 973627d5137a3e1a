"""The compression passes, installed as `fxcompress.passes`. One pass, one job, one file.

Nothing here registers itself anywhere: importing a pass only defines its class.
"""
from .fake_quant import ActivationConfig, InsertFakeQuant
from .fold_batchnorm import FoldBatchNorm
from .insert_masks import InsertMasks
from .lower_dynamic import LowerDynamicInt8
from .lower_encoded import LowerToEncoded
from .lower_integer import LowerToInteger
from .lower_sparse import LowerToSparse
from .lower_weight_only import LowerWeightOnly
from .prune_channels import PruneChannels
from .scale_channels import ScaleChannels
from .sparsegpt import SparseGPT

__all__: list[str] = ["ActivationConfig", "FoldBatchNorm", "InsertFakeQuant", "InsertMasks", "LowerDynamicInt8",
                      "LowerToEncoded", "LowerToInteger", "LowerToSparse", "LowerWeightOnly", "PruneChannels", "ScaleChannels", "SparseGPT"]
