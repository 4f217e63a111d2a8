"""The config forms every connector accepts, turned into one ``StoreConfig``,
and the namespace a connector opens it under.

vLLM's ``kv_connector_extra_config.config``, SGLang's extra config ``config``
and ``TransformersConnector.open(model, config)`` all take the same forms
(docs/configuration.md):

- a ``StoreConfig``;
- the path of a kvstore YAML file;
- one tier URL (``cpu://?capacity=8GiB``);
- a list of tiers, fastest first: tier URLs and/or tier mappings
  (``{"url": ..., "capacity": ..., "codecs": ...}``);
- a whole store config as a mapping (``{"tiers": [...], "tenant": ...}``),
  for engines whose options are JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvstore.config import StoreConfig
from kvstore.errors import ConfigError
from kvstore.keys import Namespace
from kvstore.layout import KVLayout

ConfigSource = StoreConfig | str | Path | Sequence[str | Mapping[str, Any]] | Mapping[str, Any]
"""Any form ``store_config`` accepts."""


def store_config(source: object, *, option: str = "config") -> StoreConfig:
    """The store config ``source`` names, in any accepted form; ``option`` names
    the setting it came from in the error a wrong form raises."""
    if isinstance(source, StoreConfig):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and source and "://" not in source):
        return StoreConfig.from_yaml(Path(source).expanduser())
    if isinstance(source, str) and source:
        return StoreConfig.from_urls(source)
    if isinstance(source, Mapping) and "tiers" in source:
        return StoreConfig.parse(dict(source), source=option)
    if (
        isinstance(source, Sequence)
        and not isinstance(source, str)
        and source
        and all(isinstance(tier, str | Mapping) for tier in source)
    ):
        return StoreConfig.from_urls(
            *(tier if isinstance(tier, str) else dict(tier) for tier in source)
        )
    raise ConfigError(
        f"{option} must be a kvstore YAML path, a tier URL, a list of tiers (URLs or tier "
        f"mappings) or a store config mapping with 'tiers', got {source!r}"
    )


def store_namespace(
    config: StoreConfig,
    *,
    model: str,
    revision: str,
    layout: KVLayout,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> Namespace:
    """The namespace a connector opens a store with ``config`` under: the chunk
    size, tenant salt and lossy codec come from the config, so they agree with it."""
    return Namespace(
        model=model,
        revision=revision,
        layout=layout,
        chunk_tokens=config.chunk_tokens,
        tp_rank=tp_rank,
        tp_size=tp_size,
        codec=config.lossy_codec,
        tenant=config.tenant,
    )


def text_option(options: Mapping[str, Any], name: str) -> str:
    """The string option ``name`` of a connector's options (default empty)."""
    value = options.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


__all__ = ["ConfigSource", "store_config", "store_namespace", "text_option"]
