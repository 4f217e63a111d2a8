"""The shape of a model's KV cache, as kvstore stores it.

A chunk of KV for ``t`` tokens is one tensor shaped
``[num_layers, 2, t, num_kv_heads, head_dim]`` (keys then values). Models
with multi-head latent attention (MLA) cache one latent vector per token and
layer, stored as ``[num_layers, 1, t, 1, head_dim]``, so the token dimension
is always dimension 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.dtypes import KV_DTYPES
from kvstore.errors import InvalidArgumentError

TOKEN_DIM = 2

DTYPES: dict[str, torch.dtype] = {dtype.name: getattr(torch, dtype.name) for dtype in KV_DTYPES}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unsupported KV dtype {name!r} (supported: {', '.join(DTYPES)})"
        ) from None


@dataclass(frozen=True)
class KVLayout:
    """Layers, heads, head size and dtype of a model's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgumentError(f"KVLayout.{name} must be a positive int, got {value!r}")
        dtype_from_name(self.dtype)
        if self.mla and self.num_kv_heads != 1:
            raise InvalidArgumentError("an MLA layout has exactly one latent head (num_kv_heads=1)")

    @classmethod
    def of(cls, kv: torch.Tensor, *, mla: bool = False) -> KVLayout:
        """The layout of a KV tensor shaped [layers, 2 (1 for MLA), tokens, heads, dim]."""
        if kv.dim() != 5 or kv.shape[1] != (1 if mla else 2):
            raise InvalidArgumentError(
                f"KV tensors are [layers, {1 if mla else 2}, tokens, kv_heads, head_dim], "
                f"got shape {tuple(kv.shape)}"
            )
        if kv.dtype not in DTYPE_NAMES:
            raise InvalidArgumentError(f"unsupported KV dtype {kv.dtype}")
        return cls(kv.shape[0], kv.shape[3], kv.shape[4], DTYPE_NAMES[kv.dtype], mla)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_planes(self) -> int:
        """2 (keys and values), or 1 for MLA's joint latent."""
        return 1 if self.mla else 2

    def shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """The KV tensor shape for ``tokens`` tokens."""
        return (self.num_layers, self.kv_planes, tokens, self.num_kv_heads, self.head_dim)

    def nbytes(self, tokens: int) -> int:
        """Bytes of raw KV for ``tokens`` tokens."""
        itemsize = self.torch_dtype.itemsize
        return (
            self.num_layers * self.kv_planes * tokens * self.num_kv_heads * self.head_dim * itemsize
        )

    def check(self, kv: torch.Tensor, tokens: int | None = None) -> None:
        """Raise InvalidArgumentError unless ``kv`` has this layout (and ``tokens`` tokens)."""
        expected = (
            self.shape(kv.shape[TOKEN_DIM] if tokens is None else tokens) if kv.dim() == 5 else None
        )
        if expected is None or tuple(kv.shape) != expected or kv.dtype != self.torch_dtype:
            raise InvalidArgumentError(
                f"KV tensor {tuple(kv.shape)} {kv.dtype} does not match the store's layout "
                f"{expected or self.shape(tokens or 0)} {self.torch_dtype}"
            )
