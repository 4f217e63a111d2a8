"""GPU kernels for KV movement: quantize/dequantize and paged gather/scatter.

Each operation has a Triton kernel (``.kernels``, used on CUDA) and a torch
reference with the same signature (``.reference``, used on CPU and as the
kernels' test oracle); the functions exported here pick one per call.
docs/kernels.md describes the formats, layouts and error bounds.
"""

from .formats import DEFAULT_GROUP_SIZE, QuantizedKV, QuantScheme
from .ops import (
    Backend,
    dequantize,
    gather,
    gather_quantize,
    interpreter_enabled,
    quantize,
    scatter,
    scatter_dequantize,
    triton_available,
)
from .paged import PagedKVCache, PagedLayout, check_slots
from .reference import error_bound

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "Backend",
    "PagedKVCache",
    "PagedLayout",
    "QuantScheme",
    "QuantizedKV",
    "check_slots",
    "dequantize",
    "error_bound",
    "gather",
    "gather_quantize",
    "interpreter_enabled",
    "quantize",
    "scatter",
    "scatter_dequantize",
    "triton_available",
]
