"""The Hugging Face transformers connector: prefix reuse for ``model(...)`` calls.

Given a causal LM and a prompt, the connector looks up the longest cached
prefix, rebuilds a ``DynamicCache`` from the stored chunks, runs the model on
the rest of the prompt only and stores the prompt's new whole chunks. It works
with any model whose cache is one full-attention ``DynamicLayer`` per layer
(Llama, Qwen, Mistral without a sliding window, GPT-2, ...), on any device.

Exactness: the KV a hit restores was computed by an earlier prefill, and the
suffix is computed on top of it with fewer query rows than a full prefill
would use. With ``eager`` attention, or with the chunk-aligned SDPA attention
this module registers (``use_aligned_attention``), the next-token logits then
equal a full prefill's bit for bit on CPU in fp32, provided the suffix has at
least ``min_recompute`` tokens (BLAS kernels take other paths for tiny
matrices). Plain ``sdpa`` splits queries into blocks that depend on the query
length, so its logits after a hit differ from a full prefill's in the last
bits. docs/connectors/transformers.md has the measurements.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvstore.connectors.config import ConfigSource, store_config
from kvstore.connectors.stores import shared_stores
from kvstore.errors import InvalidArgumentError, NotSupportedError
from kvstore.keys import Namespace
from kvstore.layout import DTYPE_NAMES, KVLayout
from kvstore.store import KVStore, StoreResult

__all__ = [
    "Generation",
    "Prefill",
    "Restored",
    "TransformersConnector",
    "model_layout",
    "model_namespace",
    "use_aligned_attention",
    "weights_fingerprint",
]

DEFAULT_MIN_RECOMPUTE = 16
"""Fewest prompt tokens recomputed after a hit: at least one for the next-token
logits, and enough that BLAS takes the same kernels as for a full prefill."""


# ------------------------------------------------------------------ namespace


def model_layout(model: PreTrainedModel) -> KVLayout:
    """The KV layout of ``model``'s cache: layers, KV heads, head size, dtype."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = model.dtype
    if dtype not in DTYPE_NAMES:
        raise NotSupportedError(f"models in {dtype} are not supported")
    return KVLayout(int(config.num_hidden_layers), int(kv_heads), int(head_dim), DTYPE_NAMES[dtype])


def weights_fingerprint(model: PreTrainedModel) -> str:
    """blake3 over the model's config and every tensor of its state dict, hex.

    Two models share cached KV only when this (or a revision the caller vouches
    for) matches. Hashing runs at several GB/s; pass a revision to skip it.
    """
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        hasher.update(f"\n{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        hasher.update(flat.view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def model_namespace(
    model: PreTrainedModel,
    *,
    revision: str | None = None,
    name: str | None = None,
    chunk_tokens: int = 256,
    codec: str = "raw",
    tenant: str = "",
) -> Namespace:
    """The namespace of ``model``'s KV: its name, weights fingerprint and layout.

    ``revision`` defaults to ``weights_fingerprint(model)``; ``name`` to the
    name or path the model was loaded from (else its class name).
    """
    model_name = name or model.config.name_or_path or type(model).__name__
    return Namespace(
        model=model_name,
        revision=revision or weights_fingerprint(model),
        layout=model_layout(model),
        chunk_tokens=chunk_tokens,
        codec=codec,
        tenant=tenant,
    )


# ------------------------------------------------------ chunk-aligned attention


def use_aligned_attention(model: PreTrainedModel, block_tokens: int = 256) -> str:
    """Switch ``model`` to SDPA computed in query blocks aligned to absolute
    positions (multiples of ``block_tokens``); the implementation's name.

    A query row then always meets the same blocks, whether the rows before it
    come from a restored cache or from the same forward pass, so a hit gives
    the same bits as a full prefill. ``block_tokens`` must divide the store's
    ``chunk_tokens``. Costs about what plain SDPA costs on long prompts.
    """
    if block_tokens <= 0:
        raise InvalidArgumentError(f"block_tokens must be positive, got {block_tokens}")
    name = f"kvstore_aligned_{block_tokens}"

    def aligned(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        return _aligned_attention(
            query, key, value, attention_mask, block_tokens, scaling, dropout, module.training
        )

    AttentionInterface.register(name, aligned)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return name


def _aligned_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    block: int,
    scaling: float | None,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA of ``query`` (the last rows of ``key``'s positions), one call
    per block of rows ``[b * block, (b + 1) * block)`` against keys up to the
    block's end."""
    q_len, k_len = query.shape[2], key.shape[2]
    offset = k_len - q_len
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = []
    start = offset
    while start < k_len:
        end = min((start // block + 1) * block, k_len)
        rows = slice(start - offset, end - offset)
        if mask is not None:
            block_mask = mask[:, :, rows, :end]
        else:
            positions = torch.arange(end, device=query.device)
            block_mask = positions[start:end, None] >= positions[None, :]
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, rows],
                key[:, :, :end],
                value[:, :, :end],
                attn_mask=block_mask,
                dropout_p=dropout if training else 0.0,
                scale=scaling,
            )
        )
        start = end
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------ connector


@dataclass(frozen=True)
class Restored:
    """A cache holding the reusable cached prefix of a prompt.

    cache: a ``DynamicCache`` with the prefix's KV (empty on a miss); pass it
        to ``model(...)`` or ``model.generate(...)`` with the whole prompt.
    tokens: prompt tokens it holds.
    chunk_tiers: the tier each chunk came from.
    seconds: time spent looking up, loading and rebuilding.
    """

    cache: DynamicCache
    tokens: int
    chunk_tiers: tuple[str, ...]
    seconds: float


@dataclass(frozen=True)
class Prefill:
    """A prompt's prefill through the connector.

    logits: next-token logits after the prompt, ``[vocab]``.
    cache: KV of every prompt token, ready for decoding.
    cached_tokens / computed_tokens: prompt tokens restored / run through the model.
    restore_s / forward_s: time to restore the cache / to run the model on the
        rest; together the time to the first token's logits.
    stored: what storing the prompt's new chunks did (``None`` if not stored).
    save_s: time spent storing them.
    """

    logits: torch.Tensor
    cache: DynamicCache
    cached_tokens: int
    computed_tokens: int
    chunk_tiers: tuple[str, ...]
    restore_s: float
    forward_s: float
    stored: StoreResult | None
    save_s: float

    @property
    def time_to_logits_s(self) -> float:
        return self.restore_s + self.forward_s


@dataclass(frozen=True)
class Generation:
    """Greedy generation: the new tokens and how long the first one took."""

    tokens: list[int]
    prefill: Prefill
    first_token_s: float
    total_s: float


class TransformersConnector:
    """Prefix reuse for one transformers causal LM over one kvstore.

    ``store`` must be opened with this model's namespace (``model_namespace``);
    ``open`` does both. The connector handles one sequence at a time
    (batch size 1) and is not thread-safe. ``cache_argument`` is the name the
    model takes its cache by: ``cache`` from transformers 5.20 on,
    ``past_key_values`` before.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        store: KVStore,
        *,
        min_recompute: int = DEFAULT_MIN_RECOMPUTE,
        owns_store: bool = False,
    ) -> None:
        if min_recompute < 1:
            raise InvalidArgumentError(f"min_recompute must be >= 1, got {min_recompute}")
        layout = model_layout(model)
        namespace = store.namespace
        if namespace.layout != layout:
            raise InvalidArgumentError(
                f"the store's KV layout {namespace.layout} is not the model's {layout}"
            )
        self.model = model
        self.store = store
        self.layout = layout
        self.chunk_tokens = namespace.chunk_tokens
        self.min_recompute = min_recompute
        self._owns_store = owns_store
        parameters = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keep_last = "logits_to_keep" in parameters
        self._check_cache_layers()

    @classmethod
    def open(
        cls,
        model: PreTrainedModel,
        config: ConfigSource,
        *,
        revision: str | None = None,
        name: str | None = None,
        min_recompute: int = DEFAULT_MIN_RECOMPUTE,
    ) -> TransformersConnector:
        """Open a store for ``model`` from any config form the connectors accept
        (a ``StoreConfig``, a YAML path, a tier URL, a list of tiers;
        ``kvstore.connectors.config``).

        The namespace takes chunk size, tenant and lossy codec from the config.
        """
        config = store_config(config)
        namespace = model_namespace(
            model,
            revision=revision,
            name=name,
            chunk_tokens=config.chunk_tokens,
            codec=config.lossy_codec,
            tenant=config.tenant,
        )
        store = shared_stores.acquire(config, namespace, control=True)
        try:
            return cls(model, store, min_recompute=min_recompute, owns_store=True)
        except BaseException:
            shared_stores.release(store)
            raise

    def _check_cache_layers(self) -> None:
        cache = DynamicCache(config=self.model.config)
        odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
        if odd:
            raise NotSupportedError(
                f"{type(self.model).__name__} keeps {', '.join(sorted(odd))} cache layers "
                "(sliding-window or linear attention): only full-attention KV can be "
                "restored from stored chunks"
            )

    # ---------------------------------------------------------------- restore

    def restore(self, input_ids: Sequence[int] | torch.Tensor) -> Restored:
        """A cache with the longest cached prefix of the prompt that leaves at
        least ``min_recompute`` prompt tokens to compute."""
        started = time.perf_counter()
        tokens = _token_ids(input_ids)
        limit = (len(tokens) - self.min_recompute) // self.chunk_tokens * self.chunk_tokens
        cache = DynamicCache(config=self.model.config)
        if limit <= 0:
            return Restored(cache, 0, (), time.perf_counter() - started)
        got = self.store.retrieve(tokens[:limit])
        if got.kv is None:
            return Restored(cache, 0, (), time.perf_counter() - started)
        kv = got.kv.to(self.model.device, non_blocking=True)
        for layer in range(self.layout.num_layers):
            cache.update(
                kv[layer, 0].transpose(0, 1).unsqueeze(0),
                kv[layer, 1].transpose(0, 1).unsqueeze(0),
                layer,
            )
        return Restored(cache, got.tokens, got.chunk_tiers, time.perf_counter() - started)

    def save(self, input_ids: Sequence[int] | torch.Tensor, cache: DynamicCache) -> StoreResult:
        """Store the whole chunks of the prompt whose KV ``cache`` holds.

        Only prompt tokens computed by a prefill should be stored: KV that
        decoding wrote one token at a time differs in the last bits.
        """
        tokens = _token_ids(input_ids)
        whole = min(len(tokens), cache.get_seq_length()) // self.chunk_tokens * self.chunk_tokens
        if whole == 0:
            return StoreResult(
                chunks=0, written=0, already_cached=0, failed=0, chunk_tokens=self.chunk_tokens
            )
        kv = self._cache_kv(cache, whole)
        return self.store.store(tokens[:whole], kv)

    def _cache_kv(self, cache: DynamicCache, tokens: int) -> torch.Tensor:
        """The first ``tokens`` of ``cache`` as ``[layers, 2, tokens, heads, dim]`` on CPU."""
        layers = cache.layers
        if len(layers) != self.layout.num_layers:
            raise NotSupportedError(
                f"the cache has {len(layers)} layers, the layout {self.layout.num_layers}"
            )
        out = torch.empty(self.layout.shape(tokens), dtype=self.layout.torch_dtype)
        for index, layer in enumerate(layers):
            keys = layer.keys if isinstance(layer, DynamicLayer) else None
            values = layer.values if isinstance(layer, DynamicLayer) else None
            if keys is None or values is None:
                raise NotSupportedError(f"cache layer {index} holds no full-attention KV")
            if keys.dim() != 4 or keys.shape[0] != 1:
                raise NotSupportedError("only a batch-1 DynamicCache can be stored")
            expected = (self.layout.num_kv_heads, self.layout.head_dim)
            if (keys.shape[1], keys.shape[3]) != expected:
                raise NotSupportedError(
                    f"cache layer {index} has KV of shape {tuple(keys.shape)}, "
                    f"not [1, {expected[0]}, tokens, {expected[1]}]"
                )
            out[index, 0].copy_(keys[0, :, :tokens].transpose(0, 1))
            out[index, 1].copy_(values[0, :, :tokens].transpose(0, 1))
        return out

    # ---------------------------------------------------------------- prefill

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        *,
        reuse: bool = True,
        save: bool = True,
    ) -> Prefill:
        """Next-token logits and full cache for a prompt, reusing and storing chunks.

        ``reuse=False, save=False`` is a plain full prefill through the same
        code, the reference a hit is compared with.
        """
        tokens = _token_ids(input_ids)
        if len(tokens) == 0:
            raise InvalidArgumentError("the prompt is empty")
        if reuse:
            restored = self.restore(tokens)
        else:
            restored = Restored(DynamicCache(config=self.model.config), 0, (), 0.0)
        started = time.perf_counter()
        suffix = tokens[restored.tokens :].unsqueeze(0).to(self.model.device)
        logits, cache = self._forward(suffix, restored.cache)
        forward_s = time.perf_counter() - started
        stored = None
        save_s = 0.0
        if save:
            started = time.perf_counter()
            stored = self.save(tokens, cache)
            save_s = time.perf_counter() - started
        return Prefill(
            logits=logits,
            cache=cache,
            cached_tokens=restored.tokens,
            computed_tokens=len(tokens) - restored.tokens,
            chunk_tiers=restored.chunk_tiers,
            restore_s=restored.seconds,
            forward_s=forward_s,
            stored=stored,
            save_s=save_s,
        )

    def _forward(self, ids: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
        """Run the model on ``ids`` after ``cache``; the last position's logits and the cache."""
        kwargs: dict[str, Any] = {self.cache_argument: cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, **kwargs)
        updated = getattr(out, self.cache_argument)
        if not isinstance(updated, DynamicCache):
            raise NotSupportedError(
                f"{type(self.model).__name__} returned a {type(updated).__name__}, "
                "not the DynamicCache it was given"
            )
        logits: torch.Tensor = out.logits[0, -1]
        return logits, updated

    # --------------------------------------------------------------- generate

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        *,
        reuse: bool = True,
        save: bool = True,
        eos_token_id: int | None = None,
    ) -> Generation:
        """Greedy decoding of up to ``max_new_tokens`` after a prefill through the
        connector; stops early at ``eos_token_id``."""
        if max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()
        prefill = self.prefill(input_ids, reuse=reuse, save=False)
        token = int(torch.argmax(prefill.logits))
        first_token_s = time.perf_counter() - started
        if save:
            prefill = self._saved(input_ids, prefill)
        generated = [token]
        cache = prefill.cache
        while len(generated) < max_new_tokens and token != eos_token_id:
            step = torch.tensor([[token]], device=self.model.device)
            logits, cache = self._forward(step, cache)
            token = int(torch.argmax(logits))
            generated.append(token)
        return Generation(generated, prefill, first_token_s, time.perf_counter() - started)

    def _saved(self, input_ids: Sequence[int] | torch.Tensor, prefill: Prefill) -> Prefill:
        started = time.perf_counter()
        stored = self.save(input_ids, prefill.cache)
        return Prefill(
            logits=prefill.logits,
            cache=prefill.cache,
            cached_tokens=prefill.cached_tokens,
            computed_tokens=prefill.computed_tokens,
            chunk_tiers=prefill.chunk_tiers,
            restore_s=prefill.restore_s,
            forward_s=prefill.forward_s,
            stored=stored,
            save_s=time.perf_counter() - started,
        )

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Release the store if the connector owns it (``open`` or ``owns_store``):
        a store ``open`` shares is closed, with its control server, by its last user."""
        if self._owns_store:
            self._owns_store = False
            shared_stores.release(self.store)

    def __enter__(self) -> TransformersConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _token_ids(input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A prompt as a 1-D int64 CPU tensor; batch size 1 only."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise InvalidArgumentError(
            "the connector takes one prompt ([tokens] or [1, tokens]), "
            f"got shape {tuple(ids.shape)}"
        )
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
        raise InvalidArgumentError(f"token ids must be integers, got {ids.dtype}")
    return ids.detach().to("cpu", torch.int64)
