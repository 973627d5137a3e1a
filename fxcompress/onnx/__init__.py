"""ONNX files of a compressed GraphModule: the decoded float model with named inputs and a symbolic batch, and the
int8 QDQ model of a fake-quant one that ONNX Runtime runs on its int8 kernels; each file is run in ONNX Runtime
before it is kept."""
from .export import BATCH, DEFAULT_OPSET, OPSETS, to_onnx, to_onnx_int8
from .qdq import Dequantize, QuantizeDequantize
from .respellings import ONNX_METHOD_RESPELLINGS, ONNX_RESPELLINGS

__all__ = ["BATCH", "DEFAULT_OPSET", "Dequantize", "ONNX_METHOD_RESPELLINGS", "ONNX_RESPELLINGS", "OPSETS",
           "QuantizeDequantize", "to_onnx", "to_onnx_int8"]
