"""Fingerprints of a checkpoint's weights, bound into every connector's keys.

A connector's namespace carries a revision of the weights, so KV computed
with one checkpoint is never loaded for another that shares its name. An
engine connector (vLLM, SGLang) knows where its checkpoint lives: a local
directory, or a Hugging Face repo id in the local cache. The transformers
connector has the model in memory and hashes its tensors instead
(``kvstore.connectors.transformers.weights_fingerprint``).
"""

from __future__ import annotations

from pathlib import Path

import blake3

from kvstore.errors import ConfigError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_revision(model: str, revision: str | None = None) -> str:
    """A fingerprint of the weights at ``model``: blake3 of a local directory's
    weight files and config, or the commit of a Hugging Face snapshot of
    ``model`` (at ``revision``, default the main branch) in the local cache.

    Raises ``ConfigError`` when neither applies: the connector must then be
    given a ``model_revision``.
    """
    if not model:
        raise ConfigError("no model path to fingerprint the weights of: set model_revision")
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
        "Hugging Face cache): set the connector's model_revision option"
    )


__all__ = ["weights_revision"]
