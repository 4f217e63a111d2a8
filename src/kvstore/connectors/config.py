"""The config forms every connector accepts, turned into one ``StoreConfig``,
and the namespace a connector opens it under.

vLLM's ``kv_connector_extra_config.config``, SGLang's extra config ``config``
and ``TransformersConnector.open(model, config)`` all take the same forms
(docs/configuration.md):

- a ``StoreConfig``;
- the path of a kvstore YAML file;
- one tier URL (``cpu://?capacity=8GiB``);
- a list of tiers, fastest first: tier URLs and/or tier mappings
  (``{"url": ..., "max_bytes": ..., "codecs": ...}``);
- a whole store config as a mapping (``{"tiers": [...], "tenant": ...}``),
  for engines whose options are JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvstore.config import ConfigSource, StoreConfig
from kvstore.errors import ConfigError


def store_config(source: object, *, option: str = "config") -> StoreConfig:
    """``StoreConfig.load``: the store config ``source`` names, in any accepted form."""
    return StoreConfig.load(source, option=option)


def text_option(options: Mapping[str, Any], name: str) -> str:
    """The string option ``name`` of a connector's options (default empty)."""
    value = options.get(name, "")
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


__all__ = ["ConfigSource", "store_config", "text_option"]
