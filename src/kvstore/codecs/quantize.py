"""Quantizing codecs: int8, fp8, kivi8 and kivi4 from ``kvstore.triton_kernels``.

Each quantizes the whole chunk (on the device its KV lives on: the Triton
kernels on CUDA, the torch reference on CPU) and frames the codes with their
scales and zero points, all little-endian:

| offset | size | field |
| --- | --- | --- |
| 0 | 1 | frame version (1) |
| 1 | 3 | reserved, 0 |
| 4 | 4 | group size (tokens per KIVI key group; unused by int8/fp8) |
| 8 | ... | each parameter tensor in the scheme's order, float32 |
| ... | ... | the codes (KIVI4: two a byte) |

Every size follows from the header's shape, the scheme (the codec id) and
the group size, so the frame carries no lengths; a payload of any other
length is an IntegrityError. Decoding restores the header's dtype.
"""

from __future__ import annotations

import math
import struct
import warnings

import torch
from typing_extensions import Buffer

from kvstore.buffers import byte_view
from kvstore.codecs.base import ChunkContext, TensorCodec
from kvstore.errors import ConfigError, IntegrityError
from kvstore.layout import DTYPES, KVLayout
from kvstore.triton_kernels import (
    DEFAULT_GROUP_SIZE,
    QuantizedKV,
    QuantScheme,
    dequantize,
    quantize,
)
from kvstore.triton_kernels.formats import KV_DTYPES, PARAM_DTYPE, code_shape, param_shapes

QUANTIZER_IDS: dict[QuantScheme, int] = {
    QuantScheme.INT8: 4,
    QuantScheme.FP8: 5,
    QuantScheme.KIVI8: 6,
    QuantScheme.KIVI4: 7,
}
_FRAME = struct.Struct("<B3xI")
_FRAME_VERSION = 1
_PARAM_BYTES = torch.finfo(PARAM_DTYPE).bits // 8


class QuantizeCodec(TensorCodec):
    """Quantize KV with one ``QuantScheme`` (docs/kernels.md has formats and error bounds)."""

    def __init__(self, scheme: QuantScheme, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        if scheme.symmetric and group_size != DEFAULT_GROUP_SIZE:
            raise ConfigError(f"{scheme.value} takes no group size")
        if not isinstance(group_size, int) or group_size < 1 or group_size >= 1 << 32:
            raise ConfigError(f"KIVI group size must be a positive int, got {group_size!r}")
        self.scheme = scheme
        self.group_size = group_size
        self.id = QUANTIZER_IDS[scheme]
        self.name = scheme.value

    @classmethod
    def from_spec(cls, name: str, arg: str) -> QuantizeCodec:
        """``int8``, ``fp8``, ``kivi8``, ``kivi4`` or ``kivi4:64`` (a group size) to a codec."""
        scheme = QuantScheme(name)
        if not arg:
            return cls(scheme)
        if scheme.symmetric:
            raise ConfigError(f"codec {name!r} takes no parameter, got {name}:{arg}")
        try:
            return cls(scheme, int(arg))
        except ValueError:
            raise ConfigError(f"{name} group size must be an integer, got {arg!r}") from None

    @classmethod
    def for_id(cls, codec_id: int) -> QuantizeCodec:
        """The decoder of a quantizer id (the group size comes from each payload)."""
        return cls(next(s for s, i in QUANTIZER_IDS.items() if i == codec_id))

    def spec(self) -> str:
        if self.group_size == DEFAULT_GROUP_SIZE:
            return self.name
        return f"{self.name}:{self.group_size}"

    def check_layout(self, layout: KVLayout) -> None:
        if layout.torch_dtype not in KV_DTYPES:
            raise ConfigError(
                f"codec {self.spec()!r} quantizes float16, bfloat16 or float32 KV, "
                f"not {layout.dtype}"
            )
        if self.scheme.packed and layout.head_dim % 2:
            raise ConfigError(
                f"codec {self.spec()!r} needs an even head_dim, not {layout.head_dim}"
            )

    def _sizes(self, shape: tuple[int, ...], group_size: int) -> tuple[dict[str, int], int]:
        """Bytes of each parameter tensor and of the codes, for KV of ``shape``."""
        params = {
            name: math.prod(dims) * _PARAM_BYTES
            for name, dims in param_shapes(self.scheme, shape, group_size).items()
        }
        return params, math.prod(code_shape(self.scheme, shape))

    def encode_tensor(self, kv: torch.Tensor) -> Buffer:
        q = quantize(kv, self.scheme, group_size=self.group_size)
        params, codes = self._sizes(q.shape, self.group_size)
        out = torch.empty(_FRAME.size + sum(params.values()) + codes, dtype=torch.uint8)
        view = byte_view(out)
        _FRAME.pack_into(view, 0, _FRAME_VERSION, self.group_size)
        offset = _FRAME.size
        for name in self.scheme.param_names:
            tensor = q.params[name]
            end = offset + params[name]
            out[offset:end].view(PARAM_DTYPE).view(tensor.shape).copy_(tensor)
            offset = end
        out[offset:].view(q.data.dtype).view(q.data.shape).copy_(q.data)
        return view

    def decode_tensor(
        self, data: memoryview, context: ChunkContext, out: torch.Tensor | None
    ) -> torch.Tensor:
        dtype = DTYPES[context.dtype]
        if dtype not in KV_DTYPES or len(context.shape) != 5:
            raise IntegrityError(f"a {self.name} chunk cannot hold {context.dtype} {context.shape}")
        shape = (
            context.shape[0],
            context.shape[1],
            context.shape[2],
            context.shape[3],
            context.shape[4],
        )
        if len(data) < _FRAME.size:
            raise IntegrityError(f"{self.name} payload is shorter than its frame")
        version, group_size = _FRAME.unpack_from(data, 0)
        if version != _FRAME_VERSION or group_size < 1:
            raise IntegrityError(f"{self.name} frame version {version}, group {group_size}")
        if self.scheme.packed and shape[-1] % 2:
            raise IntegrityError(f"a {self.name} chunk needs an even head_dim, not {shape[-1]}")
        params, codes = self._sizes(shape, group_size)
        if len(data) != _FRAME.size + sum(params.values()) + codes:
            raise IntegrityError(f"{self.name} payload has the wrong length for {shape}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            source = torch.frombuffer(data, dtype=torch.uint8)
        device = out.device if out is not None else torch.device("cpu")
        tensors: dict[str, torch.Tensor] = {}
        offset = _FRAME.size
        dims = param_shapes(self.scheme, shape, group_size)
        for name in self.scheme.param_names:
            end = offset + params[name]
            tensors[name] = source[offset:end].view(PARAM_DTYPE).view(dims[name]).to(device)
            offset = end
        data_codes = source[offset:].view(self.scheme.code_dtype)
        q = QuantizedKV(
            self.scheme,
            data_codes.view(code_shape(self.scheme, shape)).to(device),
            tensors,
            shape,
            dtype,
            group_size,
        )
        result: torch.Tensor = dequantize(q, out)
        return result
