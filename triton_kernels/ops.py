"""One dispatch function per operation: the Triton kernel on CUDA, the torch reference elsewhere.

``backend="auto"`` (the default) runs the Triton kernel when the tensors are
on a CUDA device and Triton is installed (the ``kvstore-llm[triton]`` extra),
and the torch reference otherwise (CPU tensors, or CUDA without Triton).
``backend="torch"`` always runs the reference; ``backend="triton"`` always
runs the kernel, which on CPU tensors needs Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Literal

import torch

from kvstore.errors import InvalidArgumentError, NotSupportedError

from . import reference
from .formats import DEFAULT_GROUP_SIZE, QuantizedKV, QuantScheme
from .paged import PagedKVCache

Backend = Literal["auto", "torch", "triton"]

_FP8_CAPABILITY = (8, 9)
"""Triton converts to float8 e4m3 on compute capability 8.9 (Ada) and newer."""


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton kernels module, or None when Triton is not installed."""
    try:
        return importlib.import_module(".kernels", __package__)
    except ImportError:
        return None


def triton_available() -> bool:
    return _kernels() is not None


def _implementation(
    backend: Backend, device: torch.device, scheme: QuantScheme | None = None
) -> ModuleType:
    """The module (``.kernels`` or ``.reference``) that runs an operation on ``device``."""
    if backend == "torch":
        return reference
    if backend not in ("auto", "triton"):
        raise InvalidArgumentError(f"backend must be 'auto', 'torch' or 'triton', not {backend!r}")
    kernels = _kernels()
    on_cuda = device.type == "cuda"
    fp8_ok = not (on_cuda and scheme is QuantScheme.FP8) or (
        torch.cuda.get_device_capability(device) >= _FP8_CAPABILITY
    )
    if backend == "auto":
        return kernels if kernels is not None and on_cuda and fp8_ok else reference
    if kernels is None:
        raise NotSupportedError(
            "the Triton backend needs Triton: pip install 'kvstore-llm[triton]'"
        )
    if not on_cuda and not interpreter_enabled():
        raise NotSupportedError(
            f"the Triton backend needs CUDA tensors (got {device}) or TRITON_INTERPRET=1"
        )
    if not fp8_ok:
        raise NotSupportedError("Triton fp8 kernels need compute capability 8.9 or newer")
    return kernels


def quantize(
    kv: torch.Tensor,
    scheme: QuantScheme,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    backend: Backend = "auto",
) -> QuantizedKV:
    """Quantize a KV chunk [layers, 2 (1 for MLA), tokens, kv_heads, head_dim]."""
    implementation = _implementation(backend, kv.device, scheme)
    result: QuantizedKV = implementation.quantize(kv, scheme, group_size=group_size)
    return result


def dequantize(
    q: QuantizedKV, out: torch.Tensor | None = None, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Dequantize ``q`` straight into ``out`` (any float dtype or strides) or a new tensor."""
    result: torch.Tensor = _implementation(backend, q.device, q.scheme).dequantize(q, out)
    return result


def gather(
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """The chunk [layers, planes, tokens, heads, dim] of the tokens at ``slot_mapping``."""
    result: torch.Tensor = _implementation(backend, cache.device).gather(cache, slot_mapping, out)
    return result


def scatter(
    chunk: torch.Tensor,
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Write ``chunk``'s tokens into ``cache`` at ``slot_mapping`` (distinct slot ids)."""
    _implementation(backend, cache.device).scatter(chunk, cache, slot_mapping)


def gather_quantize(
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    scheme: QuantScheme,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    backend: Backend = "auto",
) -> QuantizedKV:
    """Gather the tokens at ``slot_mapping`` and quantize them, in one pass on the GPU."""
    implementation = _implementation(backend, cache.device, scheme)
    result: QuantizedKV = implementation.gather_quantize(
        cache, slot_mapping, scheme, group_size=group_size
    )
    return result


def scatter_dequantize(
    q: QuantizedKV,
    cache: PagedKVCache,
    slot_mapping: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> None:
    """Dequantize ``q`` straight into ``cache`` at ``slot_mapping``, in the cache's dtype."""
    _implementation(backend, cache.device, q.scheme).scatter_dequantize(q, cache, slot_mapping)
