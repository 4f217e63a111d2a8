"""The vLLM connector's scheduler side: which tokens of a request are an external
hit, and what each step loads and saves."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore.connectors.vllm_lookup import LookupClient, local_lookup
from kvstore.connectors.vllm_metadata import KVStoreConnectorMetadata, KVStoreWorkerMetadata
from kvstore.connectors.vllm_specs import LoadSpec, SaveSpec

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvstore.connectors.vllm import KVStoreConnector

log = logging.getLogger("kvstore.connectors.vllm")


@dataclass
class _Tracked:
    """Scheduler-side state of one request."""

    request: Request
    block_ids: list[int] = field(default_factory=list)
    hit: int = 0
    loaded: int | None = None
    stored: int = 0
    prompt_saved: bool = False


def _cacheable(request: Request) -> bool:
    """Whether a request's KV follows from its token ids alone (no embeddings,
    multimodal inputs, LoRA adapter or prefix-cache salt)."""
    return (
        request.prompt_token_ids is not None
        and getattr(request, "prompt_embeds", None) is None
        and not getattr(request, "mm_features", None)
        and getattr(request, "lora_request", None) is None
        and getattr(request, "cache_salt", None) is None
    )


class SchedulerSide:
    """Decides, per step, what each worker loads and saves."""

    def __init__(self, connector: KVStoreConnector) -> None:
        self._connector = connector
        self._chunk = connector._chunk_tokens
        self._block = connector._block_size
        self._tracked: dict[str, _Tracked] = {}
        self._allocated: dict[str, tuple[int, int]] = {}
        self._finished_saves: list[SaveSpec] = []
        self._finished: list[str] = []
        self._awaiting_free: set[str] = set()
        self._client: LookupClient | None = None

    def track(self, request: Request) -> _Tracked:
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            tracked = self._tracked[request.request_id] = _Tracked(request)
        return tracked

    def _lookup(self, req_id: str, tokens: list[int]) -> int:
        array = np.asarray(tokens, dtype="<i4")
        local = local_lookup(self._connector._address)
        if local is not None:
            return local(req_id, array)
        if self._client is None:
            options = self._connector._options
            self._client = LookupClient(
                self._connector._address, self._connector._authkey, options.lookup_timeout_s
            )
        return self._client.lookup(req_id, array)

    def matched(self, request: Request, num_computed_tokens: int) -> int | None:
        """External tokens: the store's cached whole chunks past ``num_computed_tokens``;
        None (ask again next step) while a finished request's save that extends
        this prompt waits to be handed to the workers."""
        if not self._connector._can_load or not _cacheable(request):
            return 0
        limit: int = (request.num_tokens - 1) // self._chunk * self._chunk
        if limit <= num_computed_tokens:
            return 0
        whole = request.num_tokens // self._chunk * self._chunk
        tokens = list(request.all_token_ids[:whole])
        hit = min(self._lookup(request.request_id, tokens), limit)
        for spec in self._finished_saves:
            saved = len(spec.token_ids)
            if hit < saved <= limit and tokens[:saved] == spec.token_ids:
                log.debug("kvstore: %s waits for %s's save", request.request_id, spec.req_id)
                return None
        log.debug("kvstore: %s: %d of %d tokens cached", request.request_id, hit, limit)
        tracked = self.track(request)
        tracked.hit = hit
        tracked.stored = max(tracked.stored, hit)
        return max(0, hit - num_computed_tokens)

    def allocated(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            hit = self._tracked[request.request_id].hit
            self._allocated[request.request_id] = (hit, hit - num_external_tokens)

    def build(self, output: SchedulerOutput) -> KVStoreConnectorMetadata:
        metadata = KVStoreConnectorMetadata()
        for new in output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._plan(tracked, new.num_computed_tokens, output, metadata)
        cached = output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:
                tracked.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                tracked.block_ids.extend(new_blocks[0])
            self._plan(tracked, cached.num_computed_tokens[index], output, metadata)
        metadata.saves.extend(self._finished_saves)
        metadata.finished = self._finished
        self._finished_saves = []
        self._finished = []
        return metadata

    def _plan(
        self,
        tracked: _Tracked,
        computed: int,
        output: SchedulerOutput,
        metadata: KVStoreConnectorMetadata,
    ) -> None:
        request = tracked.request
        req_id = request.request_id
        load = self._allocated.pop(req_id, None)
        if load is not None:
            hit, skip = load
            metadata.loads.append(
                LoadSpec(
                    req_id,
                    list(request.all_token_ids[:hit]),
                    tracked.block_ids[: hit // self._block],
                    skip,
                )
            )
            tracked.stored = max(tracked.stored, hit)
        if not self._connector._can_save or not _cacheable(request) or tracked.prompt_saved:
            return
        done = computed + output.num_scheduled_tokens.get(req_id, 0)
        if done < request.num_prompt_tokens:
            return
        tracked.prompt_saved = True
        whole = request.num_prompt_tokens // self._chunk * self._chunk
        if whole > tracked.stored:
            metadata.saves.append(
                SaveSpec(
                    req_id,
                    list(request.prompt_token_ids[:whole]),
                    tracked.block_ids[: whole // self._block],
                    start=tracked.stored,
                    finished=False,
                )
            )
            tracked.stored = whole

    def update(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if isinstance(meta, KVStoreWorkerMetadata):
            for req_id, (asked, loaded) in meta.loads.items():
                tracked = self._tracked.get(req_id)
                if tracked is None:
                    continue
                tracked.loaded = loaded
                if loaded < asked:
                    tracked.stored = min(tracked.stored, loaded)
                    tracked.prompt_saved = False
        self._awaiting_free.difference_update(output.finished_sending or ())

    def finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._tracked.pop(request.request_id, None)
        self._allocated.pop(request.request_id, None)
        if tracked is None:
            return False, None
        self._finished.append(request.request_id)
        params = {
            "kvstore_hit_tokens": tracked.hit,
            "kvstore_loaded_tokens": tracked.hit if tracked.loaded is None else tracked.loaded,
        }
        if not (self._connector._can_save and self._connector._options.save_decode):
            return False, params
        if not _cacheable(request):
            return False, params
        whole = min(request.num_computed_tokens, len(block_ids) * self._block)
        whole = whole // self._chunk * self._chunk
        if whole <= tracked.stored:
            return False, params
        self._finished_saves.append(
            SaveSpec(
                request.request_id,
                list(request.all_token_ids[:whole]),
                list(block_ids[: whole // self._block]),
                start=tracked.stored,
                finished=True,
            )
        )
        self._awaiting_free.add(request.request_id)
        log.debug("kvstore: %s finished; saving %d tokens", request.request_id, whole)
        return True, params

    def pending_frees(self) -> bool:
        return bool(self._awaiting_free)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
