"""The vLLM connector's options (``kv_connector_extra_config``).

Kept apart from ``kvstore.connectors.vllm`` so they can be checked without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.config import StoreConfig
from kvstore.connectors.config import store_config, text_option
from kvstore.errors import ConfigError


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
    save_buffer_bytes: int
    load_threads: int | None

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
            "save_buffer_bytes",
            "load_threads",
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
        store = store_config(extra["config"], option="kv_connector_extra_config.config")
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
                ("save_decode", True),
                ("blocking_save", producer),
                ("lookup_timeout_s", 5.0),
                ("max_inflight_save_bytes", 1 << 30),
                ("save_buffer_bytes", 256 << 20),
            )
        }
        for name in ("save_decode", "blocking_save"):
            if not isinstance(options[name], bool):
                raise ConfigError(f"{name} must be true or false, got {options[name]!r}")
        timeout = options["lookup_timeout_s"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"lookup_timeout_s must be a positive number, got {timeout!r}")
        inflight = options["max_inflight_save_bytes"]
        if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight <= 0:
            raise ConfigError(f"max_inflight_save_bytes must be a positive int, got {inflight!r}")
        buffers = options["save_buffer_bytes"]
        if isinstance(buffers, bool) or not isinstance(buffers, int) or buffers < 0:
            raise ConfigError(f"save_buffer_bytes must be an int >= 0, got {buffers!r}")
        threads = extra.get("load_threads")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0
        ):
            raise ConfigError(f"load_threads must be a positive int, got {threads!r}")
        return cls(
            store=store.model_copy(update={"chunk_tokens": chunk_tokens}),
            model_name=text_option(extra, "model_name"),
            model_revision=text_option(extra, "model_revision"),
            save_decode=options["save_decode"],
            blocking_save=options["blocking_save"],
            lookup_timeout_s=float(timeout),
            max_inflight_save_bytes=inflight,
            save_buffer_bytes=buffers,
            load_threads=threads,
        )
