"""What the vLLM connector's scheduler side tells its workers each step, and what they
report back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadSpec:
    """Load the cached prefix ``token_ids`` into ``block_ids``, skipping the
    first ``skip_tokens`` (already in vLLM's own prefix cache)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    skip_tokens: int


@dataclass
class SaveSpec:
    """Save the whole chunks ``token_ids`` from ``block_ids``: layer by layer
    during this step's forward, or all layers at once for a finished request."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    finished: bool


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """What the scheduler asks the workers to load and save this step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KVStoreWorkerMetadata(KVConnectorWorkerMetadata):
    """Per request loaded this step: (tokens asked, tokens loaded); the minimum over workers."""

    loads: dict[str, tuple[int, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVStoreWorkerMetadata):
            for req_id, (asked, loaded) in other.loads.items():
                mine = self.loads.get(req_id, (asked, loaded))
                self.loads[req_id] = (asked, min(mine[1], loaded))
        return self


__all__ = ["KVStoreConnectorMetadata", "KVStoreWorkerMetadata", "LoadSpec", "SaveSpec"]
