"""Quantized KV formats: the schemes, the tensors each one produces, and their checks.

A KV chunk is ``[layers, planes, tokens, heads, head_dim]`` with ``planes`` 2
(keys, values) or 1 (an MLA latent). Quantizing it yields the codes (``data``)
and named float32 parameter tensors (scales, zero points) that the codec
layer stores beside them; docs/kernels.md lists the shapes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kvstore.errors import InvalidArgumentError

INT8_LIMIT = 127.0
"""Symmetric int8 codes span [-127, 127] (-128 is never used, so the range is symmetric)."""
FP8_DTYPE = torch.float8_e4m3fn
FP8_LIMIT = float(torch.finfo(FP8_DTYPE).max)
"""448: the largest finite e4m3 value; scales map each row's absolute max onto it."""
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_GROUP_SIZE = 32
"""Tokens per KIVI key group (the KIVI paper's G)."""
PARAM_DTYPE = torch.float32


class QuantScheme(enum.Enum):
    """How a chunk is quantized (docs/kernels.md has the formats and error bounds)."""

    INT8 = "int8"
    """Symmetric int8, one scale per (layer, plane, token, head)."""
    FP8 = "fp8"
    """float8 e4m3, one scale per (layer, plane, token, head)."""
    KIVI8 = "kivi8"
    """Asymmetric uint8: keys per channel over groups of tokens, values per token and head."""
    KIVI4 = "kivi4"
    """As KIVI8 with 4-bit codes, two a byte (even channel in the low nibble)."""

    @property
    def symmetric(self) -> bool:
        return self in (QuantScheme.INT8, QuantScheme.FP8)

    @property
    def packed(self) -> bool:
        """Whether two codes share a byte."""
        return self is QuantScheme.KIVI4

    @property
    def levels(self) -> int:
        """The largest asymmetric code (codes run from 0 to ``levels``)."""
        return 15 if self is QuantScheme.KIVI4 else 255

    @property
    def code_dtype(self) -> torch.dtype:
        return {
            QuantScheme.INT8: torch.int8,
            QuantScheme.FP8: FP8_DTYPE,
            QuantScheme.KIVI8: torch.uint8,
            QuantScheme.KIVI4: torch.uint8,
        }[self]

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.symmetric:
            return ("scale",)
        return ("key_scale", "key_zero", "value_scale", "value_zero")


def check_kv(kv: torch.Tensor, what: str = "KV") -> tuple[int, int, int, int, int]:
    """The shape of ``kv``, a float [layers, 1|2, tokens, heads, dim]."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] not in (1, 2):
        shape = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise InvalidArgumentError(
            f"{what} must be [layers, 2 (1 for MLA), tokens, kv_heads, head_dim], got {shape}"
        )
    if kv.dtype not in KV_DTYPES:
        raise InvalidArgumentError(f"{what} must be float16, bfloat16 or float32, not {kv.dtype}")
    if kv.shape[0] == 0 or kv.shape[3] == 0 or kv.shape[4] == 0:
        raise InvalidArgumentError(f"{what} needs at least one layer, head and channel: {kv.shape}")
    layers, planes, tokens, heads, head_dim = kv.shape
    return layers, planes, tokens, heads, head_dim


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise InvalidArgumentError(f"group_size must be a positive int, got {group_size!r}")


def code_shape(scheme: QuantScheme, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the codes for KV of ``shape`` (KIVI4 halves the last dimension)."""
    if scheme.packed:
        if shape[-1] % 2:
            raise InvalidArgumentError(f"4-bit packing needs an even head_dim, got {shape[-1]}")
        return (*shape[:-1], shape[-1] // 2)
    return shape


def param_shapes(
    scheme: QuantScheme, shape: tuple[int, ...], group_size: int
) -> dict[str, tuple[int, ...]]:
    """Name to shape of each parameter tensor for KV of ``shape``."""
    layers, planes, tokens, heads, head_dim = shape
    if scheme.symmetric:
        return {"scale": (layers, planes, tokens, heads)}
    groups = -(-tokens // group_size)
    value_tokens = tokens if planes == 2 else 0
    return {
        "key_scale": (layers, groups, heads, head_dim),
        "key_zero": (layers, groups, heads, head_dim),
        "value_scale": (layers, value_tokens, heads),
        "value_zero": (layers, value_tokens, heads),
    }


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """Codes plus named parameter tensors for one quantized KV chunk.

    ``shape`` and ``dtype`` are those of the KV before quantizing, which
    ``dequantize`` restores by default. Every tensor has the layer as its
    first dimension, so ``layer(i)`` can slice one out.
    """

    scheme: QuantScheme
    data: torch.Tensor
    params: Mapping[str, torch.Tensor]
    shape: tuple[int, int, int, int, int]
    dtype: torch.dtype
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise InvalidArgumentError(f"quantized KV must restore a float dtype, not {self.dtype}")
        check_group_size(self.group_size)
        expected = code_shape(self.scheme, self.shape)
        if tuple(self.data.shape) != expected or self.data.dtype != self.scheme.code_dtype:
            raise InvalidArgumentError(
                f"{self.scheme.value} codes must be {expected} {self.scheme.code_dtype}, "
                f"got {tuple(self.data.shape)} {self.data.dtype}"
            )
        shapes = param_shapes(self.scheme, self.shape, self.group_size)
        if set(self.params) != set(shapes):
            raise InvalidArgumentError(
                f"{self.scheme.value} parameters are {sorted(shapes)}, got {sorted(self.params)}"
            )
        for name, want in shapes.items():
            tensor = self.params[name]
            if tuple(tensor.shape) != want or tensor.dtype != PARAM_DTYPE:
                raise InvalidArgumentError(
                    f"{name} must be {want} float32, got {tuple(tensor.shape)} {tensor.dtype}"
                )
            if tensor.device != self.data.device:
                raise InvalidArgumentError(f"{name} is on {tensor.device}, not {self.data.device}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of codes and parameters together (what a chunk stores)."""
        tensors = (self.data, *self.params.values())
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def layer(self, index: int) -> QuantizedKV:
        """The one-layer QuantizedKV of layer ``index`` (views, no copies)."""
        _, planes, tokens, heads, head_dim = self.shape
        return QuantizedKV(
            self.scheme,
            self.data[index : index + 1],
            {name: tensor[index : index + 1] for name, tensor in self.params.items()},
            (1, planes, tokens, heads, head_dim),
            self.dtype,
            self.group_size,
        )


def check_dequantize_out(q: QuantizedKV, out: torch.Tensor | None) -> torch.Tensor:
    """``out`` checked against ``q``'s shape and device, or a new tensor of ``q``'s dtype."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tuple(out.shape) != q.shape or out.dtype not in KV_DTYPES or out.device != q.device:
        raise InvalidArgumentError(
            f"out must be a float tensor {q.shape} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def empty_quantized(
    scheme: QuantScheme,
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> QuantizedKV:
    """An uninitialised QuantizedKV for KV of ``shape`` and ``dtype``, for a kernel to fill."""
    check_group_size(group_size)
    data = torch.empty(code_shape(scheme, shape), dtype=scheme.code_dtype, device=device)
    params = {
        name: torch.empty(param_shape, dtype=PARAM_DTYPE, device=device)
        for name, param_shape in param_shapes(scheme, shape, group_size).items()
    }
    return QuantizedKV(scheme, data, params, shape, dtype, group_size)
