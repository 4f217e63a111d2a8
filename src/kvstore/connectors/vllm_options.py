"""The vLLM connector's options (``kv_connector_extra_config``) and model fingerprint.

Kept apart from ``kvstore.connectors.vllm`` so they can be checked without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from kvstore.config import StoreConfig
from kvstore.errors import ConfigError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def store_config(option: Any) -> StoreConfig:
    """The store config the ``config`` option names: a kvstore YAML file, a tier URL,
    or a list of tiers, fastest first (URLs, or mappings with per-tier options)."""
    if isinstance(option, str) and option and "://" not in option:
        return StoreConfig.from_yaml(Path(option).expanduser())
    if isinstance(option, str) and option:
        return StoreConfig.from_urls(option)
    if isinstance(option, list) and option and all(isinstance(t, str | dict) for t in option):
        return StoreConfig.from_urls(*option)
    raise ConfigError(
        "kv_connector_extra_config.config must be a kvstore YAML path, a tier URL or a list "
        f"of tiers (URLs or tier mappings), got {option!r}"
    )


@dataclass(frozen=True)
class ConnectorOptions:
    """``kv_connector_extra_config``, checked (docs/connectors/vllm.md describes each)."""

    store: StoreConfig
    model_name: str
    model_revision: str
    save_decode: bool
    blocking_save: bool
    lookup_timeout_s: float
    max_inflight_save_bytes: int

    @classmethod
    def parse(cls, extra: dict[str, Any], *, producer: bool, block_size: int) -> ConnectorOptions:
        known = {
            "config",
            "chunk_tokens",
            "model_name",
            "model_revision",
            "save_decode",
            "blocking_save",
            "lookup_timeout_s",
            "max_inflight_save_bytes",
        }
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config keys {unknown} (known: {sorted(known)})"
            )
        if "config" not in extra:
            raise ConfigError(
                "kv_connector_extra_config needs 'config': a kvstore YAML path or tier URL(s)"
            )
        store = store_config(extra["config"])
        chunk_tokens = extra.get("chunk_tokens", store.chunk_tokens)
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
        if chunk_tokens % block_size:
            raise ConfigError(
                f"chunk_tokens={chunk_tokens} must be a multiple of vLLM's block size "
                f"({block_size}): chunks are saved and loaded as whole blocks"
            )
        options = {
            name: extra.get(name, default)
            for name, default in (
                ("model_name", ""),
                ("model_revision", ""),
                ("save_decode", True),
                ("blocking_save", producer),
                ("lookup_timeout_s", 5.0),
                ("max_inflight_save_bytes", 1 << 30),
            )
        }
        for name in ("model_name", "model_revision"):
            if not isinstance(options[name], str):
                raise ConfigError(f"{name} must be a string, got {options[name]!r}")
        for name in ("save_decode", "blocking_save"):
            if not isinstance(options[name], bool):
                raise ConfigError(f"{name} must be true or false, got {options[name]!r}")
        timeout = options["lookup_timeout_s"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"lookup_timeout_s must be a positive number, got {timeout!r}")
        inflight = options["max_inflight_save_bytes"]
        if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight <= 0:
            raise ConfigError(f"max_inflight_save_bytes must be a positive int, got {inflight!r}")
        return cls(
            store=store.model_copy(update={"chunk_tokens": chunk_tokens}),
            model_name=options["model_name"],
            model_revision=options["model_revision"],
            save_decode=options["save_decode"],
            blocking_save=options["blocking_save"],
            lookup_timeout_s=float(timeout),
            max_inflight_save_bytes=inflight,
        )


def weights_revision(model: str, revision: str | None) -> str:
    """A fingerprint of the model's weights: blake3 of a local directory's weight
    files and config, or the commit of a Hugging Face snapshot in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        files = sorted(
            item
            for item in path.iterdir()
            if item.is_file() and (item.suffix in _WEIGHT_SUFFIXES or item.name == "config.json")
        )
        if not any(item.suffix in _WEIGHT_SUFFIXES for item in files):
            raise ConfigError(f"no weight files in {path}: set model_revision")
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for item in files:
            hasher.update(item.name.encode() + b"\0")
            hasher.update_mmap(item)
        return "blake3:" + hasher.hexdigest()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json", revision=revision)
    if isinstance(cached, str):
        return "commit:" + Path(cached).parent.name
    raise ConfigError(
        f"cannot fingerprint the weights of {model!r} (not a local directory nor in the "
        "Hugging Face cache): set kv_connector_extra_config.model_revision"
    )
