"""Content-hashed chunk keys (the key spec, docs/key-spec.md, version 1).

Tokens are cut into chunks of ``chunk_tokens``. Chunk ``i``'s key is
``blake3(namespace_digest || key(i-1) || tokens_i as little-endian int32)``,
32 bytes, with ``key(-1) = namespace_digest``: each key commits to the whole
prefix before it, so equal keys mean equal prefixes. The namespace digest binds
everything else that makes KV differ (model, weights, layout, parallelism,
codec, tenant), so two prompts that differ in any of it never share a key.
Only whole chunks get keys: a trailing partial chunk is neither stored nor
reported by lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import blake3
import numpy as np
import numpy.typing as npt
import torch

from kvstore.errors import InvalidArgumentError, InvalidKeyError
from kvstore.layout import KVLayout

KEY_SPEC_VERSION = 1
KEY_BYTES = 32
_NAMESPACE_TAG = b"kvstore-namespace-v1\n"
_INT32_MAX = 2**31 - 1

TokenIds = Sequence[int] | npt.NDArray[np.integer] | torch.Tensor


@dataclass(frozen=True)
class Namespace:
    """Everything besides the tokens that decides what KV a prompt produces.

    model: the model's name (``meta-llama/Llama-3.1-8B``).
    revision: a fingerprint of the weights (a revision hash or weights digest).
    layout: the KV layout (layers, heads, head dim, dtype, MLA).
    chunk_tokens: tokens per chunk.
    tp_rank / tp_size: this worker's tensor-parallel rank and the TP size.
    codec: the lossy transform applied to KV, if any (``raw`` for none);
        lossless compression does not change KV and is not part of the key.
    tenant: an optional secret salt; tenants with different salts never share
        or probe each other's keys.
    """

    model: str
    revision: str
    layout: KVLayout
    chunk_tokens: int = 256
    tp_rank: int = 0
    tp_size: int = 1
    codec: str = "raw"
    tenant: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "revision", "codec", "tenant"):
            value = getattr(self, name)
            if not isinstance(value, str) or "\n" in value:
                raise InvalidArgumentError(f"Namespace.{name} must be a one-line string")
        if not self.model:
            raise InvalidArgumentError("Namespace.model must not be empty")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            raise InvalidArgumentError("Namespace.chunk_tokens must be a positive int")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgumentError(
                f"need 0 <= tp_rank < tp_size, got rank {self.tp_rank} of {self.tp_size}"
            )

    def canonical_bytes(self) -> bytes:
        """The exact bytes hashed into the namespace digest (see the key spec)."""
        fields = (
            ("model", self.model),
            ("revision", self.revision),
            ("num_layers", self.layout.num_layers),
            ("num_kv_heads", self.layout.num_kv_heads),
            ("head_dim", self.layout.head_dim),
            ("dtype", self.layout.dtype),
            ("mla", int(self.layout.mla)),
            ("chunk_tokens", self.chunk_tokens),
            ("tp_rank", self.tp_rank),
            ("tp_size", self.tp_size),
            ("codec", self.codec),
            ("tenant", self.tenant),
        )
        return _NAMESPACE_TAG + b"".join(f"{k}={v}\n".encode() for k, v in fields)

    def digest(self) -> bytes:
        """blake3 of ``canonical_bytes()``, 32 bytes: the key of chunk -1."""
        return blake3.blake3(self.canonical_bytes()).digest()


def token_array(tokens: TokenIds) -> npt.NDArray[np.int32]:
    """Tokens as a 1-D little-endian int32 array; ids must be in [0, 2**31)."""
    if isinstance(tokens, torch.Tensor):
        array = tokens.detach().cpu().numpy()
    else:
        array = np.asarray(tokens)
    if array.ndim != 1:
        raise InvalidArgumentError(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.empty(0, dtype="<i4")
    if array.dtype.kind not in "iu":
        raise InvalidArgumentError(f"token ids must be integers, got dtype {array.dtype}")
    if int(array.min()) < 0 or int(array.max()) > _INT32_MAX:
        raise InvalidArgumentError("token ids must be in [0, 2**31)")
    return array.astype("<i4", copy=False)


def chunk_keys(
    namespace_digest: bytes, tokens: TokenIds, chunk_tokens: int, *, after: bytes | None = None
) -> list[bytes]:
    """The keys of every whole chunk of ``tokens``, in order. ``after``: the key
    of the chunk ``tokens`` follow (their prefix's last chunk, already hashed),
    so a prompt that grows is hashed only for its new chunks; the keys are those
    of the same chunks in the whole prompt."""
    if len(namespace_digest) != KEY_BYTES:
        raise InvalidArgumentError("a namespace digest is 32 bytes")
    if after is not None and len(after) != KEY_BYTES:
        raise InvalidArgumentError("a chunk key is 32 bytes")
    data = token_array(tokens)
    whole = len(data) // chunk_tokens
    raw = data[: whole * chunk_tokens].tobytes()
    step = chunk_tokens * 4
    keys: list[bytes] = []
    previous = namespace_digest if after is None else after
    for start in range(0, whole * step, step):
        hasher = blake3.blake3(namespace_digest)
        hasher.update(previous)
        hasher.update(raw[start : start + step])
        previous = hasher.digest()
        keys.append(previous)
    return keys


TAG_BYTES = 8
"""Bytes of each tag that prefixes a chunk key in a storage key."""
STORAGE_KEY_BYTES = 2 * TAG_BYTES + KEY_BYTES
"""A storage key: tenant tag, namespace tag, chunk key (docs/key-spec.md)."""
NAMED_CHUNK_TAG = b"kvstore-named-chunk-v1\n"

Scope = Literal["namespace", "tenant", "all"]
"""Which stored chunks a tier-wide operation touches: this store's namespace, every
namespace of its tenant, or everything in the tiers, whoever wrote it."""


def tenant_tag(tenant: str) -> bytes:
    """The tag of a tenant's storage keys; without the salt it cannot be computed."""
    return blake3.blake3(b"kvstore-tenant-tag-v1\n" + tenant.encode()).digest()[:TAG_BYTES]


def namespace_tag(namespace_digest: bytes) -> bytes:
    """The tag of one namespace's storage keys, derived from its digest."""
    return blake3.blake3(b"kvstore-namespace-tag-v1\n" + namespace_digest).digest()[:TAG_BYTES]


def storage_prefix(namespace: Namespace) -> bytes:
    """What the storage key of each of ``namespace``'s chunks starts with."""
    return tenant_tag(namespace.tenant) + namespace_tag(namespace.digest())


def chunk_key_of(storage_key: bytes) -> bytes:
    """The chunk key a storage key ends with: the key a chunk's header carries."""
    return storage_key[-KEY_BYTES:]


def named_chunk_key(namespace_digest: bytes, name: bytes) -> bytes:
    """The chunk key of a chunk an engine names itself (SGLang's page hashes)
    instead of by tokens: ``blake3(namespace digest || b"kvstore-named-chunk-v1\\n"
    || name)``. The engine's naming must make equal names mean equal KV within
    the namespace."""
    if type(name) is not bytes or not name:
        raise InvalidKeyError(f"chunk names are non-empty bytes, got {name!r}")
    hasher = blake3.blake3(namespace_digest)
    hasher.update(NAMED_CHUNK_TAG)
    hasher.update(name)
    return hasher.digest()


def default_scope(namespace: Namespace) -> Scope:
    """``tenant`` for a namespace with a tenant salt (so one tenant never touches
    another's chunks), else ``all``."""
    return "tenant" if namespace.tenant else "all"


def scope_prefix(namespace_prefix: bytes, scope: Scope) -> bytes:
    """What the storage keys of ``scope`` start with, for the namespace whose
    storage keys start with ``namespace_prefix``."""
    if scope == "namespace":
        return namespace_prefix
    if scope == "tenant":
        return namespace_prefix[:TAG_BYTES]
    if scope == "all":
        return b""
    raise InvalidArgumentError(f"scope must be namespace, tenant or all, got {scope!r}")
