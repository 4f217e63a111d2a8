"""An SGLang HiCache storage backend on a kvstore hierarchical store.

SGLang loads it as a dynamic storage backend::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.connectors.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "config": "/etc/kvstore.yaml"}'

SGLang names each page of KV by a hash string that chains the page's tokens
to every page before it. Each page becomes one kvstore chunk (one chunk is one
page, so the store's ``chunk_tokens`` is SGLang's page size) under the key
``store.named_keys([page hash + shard])``: blake3 of the name under the
store's namespace, which binds the model, its weights (a fingerprint of the
checkpoint unless a ``model_revision`` is given), the KV layout, the
tensor-parallel rank of MHA models (MLA KV is the same on every rank, so MLA
ranks share pages) and the tenant; the shard names the pipeline and context
parallel ranks. Chunks hold the page in kvstore's layout
``[layers, 2, page, heads, dim]`` (``[layers, 1, page, 1, dim]`` for MLA),
whatever the host pool's memory layout, so engines with different
``--hicache-mem-layout`` share pages. Every chunk is verified on read: a
corrupt or foreign page is a miss, never KV handed to SGLang.

This module imports SGLang (it subclasses SGLang's ``HiCacheStorage``), so
import it only inside an SGLang process; ``kvstore.connectors`` itself does not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from kvstore.config import StoreConfig
from kvstore.connectors.config import store_config, text_option
from kvstore.connectors.stores import shared_stores
from kvstore.connectors.weights import weights_revision
from kvstore.errors import ConfigError, InvalidArgumentError, NotSupportedError
from kvstore.layout import DTYPE_NAMES, KVLayout
from kvstore.store import KVStore

ChunkView = Callable[[torch.Tensor], torch.Tensor]
_NOT_REGISTERED = "the SGLang host pool is not registered yet (register_mem_pool_host)"

# How a page of each SGLang host pool layout, as ``get_data_page(index, flat=False)``
# returns it (dimensions in the comments), is viewed as a kvstore chunk
# [layers, planes, page, heads, dim].
_MHA_PAGES: dict[str, tuple[int, ChunkView]] = {
    "layer_first": (5, lambda p: p.permute(1, 0, 2, 3, 4)),  # [2, layers, page, heads, dim]
    "page_first": (5, lambda p: p.permute(2, 0, 1, 3, 4)),  # [2, page, layers, heads, dim]
    "page_first_direct": (6, lambda p: p[:, 0].permute(1, 0, 2, 3, 4)),  # [2, 1, L, page, H, D]
    "page_head": (6, lambda p: p[:, 0].permute(3, 0, 2, 1, 4)),  # [2, 1, heads, page, L, dim]
}
_MLA_PAGES: dict[str, tuple[int, ChunkView]] = {
    "layer_first": (4, lambda p: p.unsqueeze(1)),  # [layers, page, 1, dim]
    "page_first": (4, lambda p: p.permute(1, 0, 2, 3).unsqueeze(1)),  # [page, layers, 1, dim]
    "page_first_direct": (5, lambda p: p[0].unsqueeze(1)),  # [1, layers, page, 1, dim]
}


@dataclass(frozen=True)
class HostPages:
    """The pages of one SGLang host memory pool, seen as kvstore chunks.

    ``chunk(index)`` is a view of the page starting at host token ``index``
    (no copy: loading into it writes the host pool); ``flat_chunk(data)`` views a
    flat page tensor, as ``get_data_page``/``get_dummy_flat_data_page`` make them.
    """

    pool: Any
    kv_layout: KVLayout
    page_size: int
    page_shape: tuple[int, ...]
    view: ChunkView

    @classmethod
    def of(cls, pool: Any, *, mla: bool) -> HostPages:
        """Read the geometry of ``pool`` (an MHA or MLA host pool) from its first page."""
        layout = getattr(pool, "layout", None)
        views = _MLA_PAGES if mla else _MHA_PAGES
        kind = "MLA" if mla else "MHA"
        if layout not in views or not hasattr(pool, "get_data_page"):
            raise NotSupportedError(
                f"kvstore's SGLang backend supports {kind} host pools with layouts "
                f"{', '.join(views)}; got {type(pool).__name__} with layout {layout!r}"
            )
        try:
            page = pool.get_data_page(0, flat=False)
        except NotImplementedError as exc:  # SGLang's pools without plain pages (MXFP8, ...)
            raise NotSupportedError(f"{type(pool).__name__} has no plain KV pages: {exc}") from exc
        dtype = DTYPE_NAMES.get(page.dtype)
        if dtype is None:
            raise NotSupportedError(f"kvstore cannot store KV of dtype {page.dtype}")
        ndim, view = views[layout]
        chunk = view(page) if page.dim() == ndim else None
        planes = 1 if mla else 2
        if chunk is None or chunk.shape[1] != planes or chunk.shape[2] != pool.page_size:
            raise NotSupportedError(
                f"{type(pool).__name__} ({layout}) pages have shape {tuple(page.shape)}, "
                f"not the {kind} page layout kvstore reads"
            )
        layers, _, page_size, heads, dim = chunk.shape
        return cls(
            pool=pool,
            kv_layout=KVLayout(layers, heads, dim, dtype, mla),
            page_size=page_size,
            page_shape=tuple(page.shape),
            view=view,
        )

    def chunk(self, index: int) -> torch.Tensor:
        return self.view(self.pool.get_data_page(index, flat=False))

    def flat_chunk(self, data: torch.Tensor) -> torch.Tensor:
        if data.numel() != math.prod(self.page_shape):
            raise InvalidArgumentError(
                f"a flat page has {math.prod(self.page_shape)} elements, got {data.numel()}"
            )
        return self.view(data.view(self.page_shape))

    def page_starts(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[int]:
        """The host token index of each key's page: ``host_indices[i * page_size]``."""
        if host_indices.numel() != len(keys) * self.page_size:
            raise InvalidArgumentError(
                f"{host_indices.numel()} host indices for {len(keys)} pages of {self.page_size}"
            )
        starts: list[int] = host_indices[:: self.page_size].tolist()
        return starts


def _config_option(extra: Mapping[str, Any]) -> Any:
    """The ``config`` option, or its deprecated spelling ``kvstore_config``."""
    if "kvstore_config" in extra:
        if "config" in extra:
            raise ConfigError("give config, not both config and its old name kvstore_config")
        warnings.warn(
            "the SGLang backend's kvstore_config option is now called config; "
            "kvstore_config will be removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return extra["kvstore_config"]
    if "config" not in extra:
        raise ConfigError(
            "--hicache-storage-backend-extra-config needs config: a kvstore YAML path, "
            "a tier URL or a list of tiers"
        )
    return extra["config"]


def _checkpoint_revision(model_path: str) -> str:
    """The fingerprint of the weights at ``model_path``; refuses to start without one."""
    try:
        return weights_revision(model_path)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}. kvstore binds the weights into every cache key so that a changed "
            "checkpoint never loads KV computed with the old one: give model_revision (a "
            "revision or digest of the weights) or model_path (the checkpoint directory) "
            "in --hicache-storage-backend-extra-config"
        ) from None


def _first_rank(config: HiCacheStorageConfig) -> bool:
    """Whether this is the first of the engine's ranks, the one that serves the
    control API (every rank would listen on the same port)."""
    return (config.tp_rank, config.pp_rank, config.attn_cp_rank, config.dp_rank) == (0, 0, 0, 0)


def paged(config: StoreConfig, page_size: int) -> StoreConfig:
    """``config`` with one chunk per SGLang page; a config that sets another
    ``chunk_tokens`` is refused rather than silently changed."""
    if "chunk_tokens" in config.model_fields_set and config.chunk_tokens != page_size:
        raise ConfigError(
            f"kvstore config sets chunk_tokens={config.chunk_tokens}, but a chunk is one SGLang "
            f"page of {page_size} tokens: drop chunk_tokens or set it to the page size"
        )
    return config.model_copy(update={"chunk_tokens": page_size})


def shard_suffix(config: HiCacheStorageConfig) -> str:
    """What sets this rank's pages apart besides the namespace: PP and attention-CP ranks."""
    suffix = ""
    if config.pp_size > 1:
        suffix += f"_pp{config.pp_rank}of{config.pp_size}"
    if config.attn_cp_size > 1:
        suffix += f"_cp{config.attn_cp_rank}of{config.attn_cp_size}"
    return suffix


class KVStoreHiCacheStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` on a kvstore hierarchical store.

    Built by SGLang's storage backend factory as ``KVStoreHiCacheStorage(storage_config,
    kwargs)``; the store opens when SGLang registers its host memory pool (the
    pool fixes the KV layout and page size). Options, from
    ``storage_config.extra_config``:

    config: the store config, in any form the connectors accept (a kvstore
        YAML path, a tier URL, a list of tier URLs and/or tier mappings, or a
        store config mapping; docs/configuration.md). ``kvstore_config`` is
        its deprecated spelling.
    model_name: the model name bound into every key (default: SGLang's model
        name, ``--served-model-name`` or else ``--model-path``).
    model_revision: a fingerprint of the weights (revision or digest) bound
        into every key, so a changed checkpoint never loads old KV. Default:
        ``weights_revision(model_path)``, a digest of the local checkpoint's
        weight files or the commit of its Hugging Face snapshot; when the
        weights cannot be found the backend refuses to start.
    model_path: where the weights are, for that fingerprint (default:
        SGLang's model name, which is ``--model-path`` unless a served
        model name is set).
    interface_v1: SGLang's own switch; with 1 SGLang calls the zero-copy
        ``batch_get_v1``/``batch_set_v1``, which move pages straight between
        the host pool and the store.

    A failing tier is a miss (``False``, ``None``, a shorter prefix): the store
    logs it and serves from the other tiers.
    """

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: Mapping[str, Any] | None = None
    ) -> None:
        """``kwargs`` are the factory's extra keyword arguments (none for dynamic backends)."""
        extra = dict(storage_config.extra_config or {})
        if storage_config.should_split_heads or storage_config.dcp_size > 1:
            raise NotSupportedError(
                "kvstore's SGLang backend does not support heterogeneous TP head splitting "
                "(tp_lcm_size) or decode context parallelism"
            )
        self.config = store_config(_config_option(extra), option="config")
        self.model_name = text_option(extra, "model_name") or storage_config.model_name or ""
        if not self.model_name:
            raise ConfigError("SGLang passed no model name to bind the cache keys to")
        self.revision = text_option(extra, "model_revision") or _checkpoint_revision(
            text_option(extra, "model_path") or storage_config.model_name or ""
        )
        self.storage_config = storage_config
        self.suffix = shard_suffix(storage_config)
        self.pages: HostPages | None = None
        self._store: KVStore | None = None

    # ------------------------------------------------------------ set-up

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Open the store for the host pool's KV layout and page size."""
        super().register_mem_pool_host(mem_pool_host)
        config = self.storage_config
        pages = HostPages.of(mem_pool_host, mla=config.is_mla_model)
        store_cfg = paged(self.config, pages.page_size)
        namespace = store_cfg.namespace(
            model=self.model_name,
            revision=self.revision,
            layout=pages.kv_layout,
            tp_rank=0 if config.is_mla_model else config.tp_rank,
            tp_size=1 if config.is_mla_model else config.tp_size,
        )
        self.close()
        self._store = shared_stores.acquire(store_cfg, namespace, control=_first_rank(config))
        self.pages = pages

    @property
    def store(self) -> KVStore:
        """The kvstore behind this backend, once SGLang has registered its host pool."""
        if self._store is None:
            raise InvalidArgumentError(_NOT_REGISTERED)
        return self._store

    def _pages(self) -> HostPages:
        if self.pages is None:
            raise InvalidArgumentError(_NOT_REGISTERED)
        return self.pages

    def keys(self, page_keys: Sequence[str]) -> list[bytes]:
        """The storage key of each SGLang page hash on this rank."""
        return self.store.named_keys([(key + self.suffix).encode() for key in page_keys])

    # ---------------------------------------------------------- zero copy

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Load pages straight into the host pool; ``True`` for the loaded prefix."""
        pages = self._pages()
        outs = [pages.chunk(start) for start in pages.page_starts(keys, host_indices)]
        loaded = self._retrieve(keys, outs)
        return [i < loaded for i in range(len(keys))]

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store pages straight from the host pool; all ``True`` if every page is stored."""
        pages = self._pages()
        chunks = [pages.chunk(start) for start in pages.page_starts(keys, host_indices)]
        return [self._store_pages(keys, chunks)] * len(keys)

    # ------------------------------------------------------- flat pages

    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        """Load pages into flat page tensors (new ones without ``target_locations``);
        ``None`` from the first page that could not be loaded on."""
        pages = self._pages()
        if target_locations is None:
            dtype = pages.kv_layout.torch_dtype
            targets = [torch.empty(math.prod(pages.page_shape), dtype=dtype) for _ in keys]
        else:
            targets = list(target_locations)
        if len(targets) != len(keys):
            raise InvalidArgumentError(f"{len(targets)} target pages for {len(keys)} keys")
        loaded = self._retrieve(keys, [pages.flat_chunk(target) for target in targets])
        return [target if i < loaded else None for i, target in enumerate(targets)]

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return self.batch_set([key], None if value is None else [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store flat page tensors (``get_data_page`` output); ``True`` if all are stored."""
        if values is None:
            raise NotSupportedError(
                "kvstore's SGLang backend takes page tensors (values) or host indices "
                "(batch_set_v1), not raw buffer addresses"
            )
        pages = self._pages()
        values = list(values)
        if len(values) != len(keys):
            raise InvalidArgumentError(f"{len(values)} pages for {len(keys)} keys")
        return self._store_pages(keys, [pages.flat_chunk(value) for value in values])

    # ------------------------------------------------------------ queries

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading pages of ``keys`` some tier holds."""
        return len(self.store.locate(self.keys(keys)))

    def clear(self) -> None:
        """Delete every page of this backend's namespace from every tier."""
        self.store.clear(scope="namespace")

    def close(self) -> None:
        """Release the store: the last user in the process stops its control
        server, finishes background writes and closes it (SGLang calls this on
        detach)."""
        if self._store is not None:
            store, self._store = self._store, None
            shared_stores.release(store)

    # ------------------------------------------------------------ helpers

    def _retrieve(self, keys: Sequence[str], outs: list[torch.Tensor]) -> int:
        """Pages of the loaded prefix of ``keys``."""
        return len(self.store.retrieve_chunks(self.keys(keys), outs))

    def _store_pages(self, keys: Sequence[str], chunks: list[torch.Tensor]) -> bool:
        """Whether every page is now in the first tier (written or already there)."""
        return self.store.store_chunks(self.keys(keys), chunks).failed == 0


__all__ = ["HostPages", "KVStoreHiCacheStorage", "paged", "shard_suffix"]
