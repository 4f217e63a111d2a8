"""Model shapes and defaults of ``kvstore demo`` (no heavy imports: the CLI reads these)."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidArgumentError


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a demo model (Llama architecture)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(64, 2, 4, 2, 128, 2048),
    "small": ModelPreset(512, 8, 8, 4, 1408, 8192),
    "medium": ModelPreset(768, 12, 12, 4, 2048, 16384),
    "1b": ModelPreset(2048, 16, 32, 8, 8192, 32768),
}
"""Model sizes ``--model-size`` offers; ``1b`` has Llama 3.2 1B's layer shapes."""

PRESET_NAMES = tuple(PRESETS)
DEFAULT_PRESET = "small"
DEFAULT_CONTEXT = 4096
DEFAULT_REQUESTS = 12


def check_workload_size(*, context: int, requests: int, new_tokens: int) -> None:
    """Raise InvalidArgumentError unless a workload of these sizes can be built:
    ``requests >= 1``, ``context >= 512`` and ``1 <= new_tokens <= context / 8``."""
    if requests < 1:
        raise InvalidArgumentError(f"requests must be >= 1, got {requests}")
    if context < 512 or new_tokens < 1 or new_tokens > context // 8:
        raise InvalidArgumentError(
            f"need context >= 512 and 1 <= new_tokens <= context / 8, got {context}, {new_tokens}"
        )
