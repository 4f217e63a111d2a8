"""What the vLLM connector's scheduler side tells its workers each step, and what they
report back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvstore.connectors.vllm_specs import LoadSpec, SaveSpec


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """What the scheduler asks the workers to load and save this step."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    """Requests that finished: the workers forget their keys after this step's saves."""


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


__all__ = ["KVStoreConnectorMetadata", "KVStoreWorkerMetadata"]
