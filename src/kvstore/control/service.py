"""The control API's one implementation: operations on a running store, per caller.

``ControlService`` is the Python API; the HTTP server and the CLI are thin
layers over it. Every operation takes its request model (validated by
pydantic) and the calling ``Principal``. A tenant acts only inside its own
key space: the service opens a view of the store under the tenant's salt
(``AsyncKVStore.scoped``), so the tenant's keys, and with them every lookup,
pin, clear, move and counter, are disjoint from everyone else's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from kvstore.config import ControlConfig
from kvstore.control.auth import ADMIN, Principal, secret_value
from kvstore.control.jobs import JobManager
from kvstore.control.models import (
    ClearRequest,
    CompressRequest,
    Counters,
    HealthReply,
    JobInfo,
    JobList,
    LookupReply,
    LookupRequest,
    MoveRequest,
    PinReply,
    PinRequest,
    Prompt,
    ScopeName,
    StatsReply,
    TierHealthInfo,
    TierUsage,
    UnpinRequest,
)
from kvstore.errors import (
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    NotSupportedError,
    PermissionDeniedError,
)
from kvstore.keys import Namespace
from kvstore.store import AsyncKVStore


class ControlService:
    """Control operations on ``store`` (lookup, pin, clear, move, compress, health, stats).

    namespaces: more namespaces callers may name (``model``), by name; the
        store's own is always there under its model's name. They must share
        the store's KV layout and chunk size.
    environ: where ``*_env`` secrets are read (default ``os.environ``).
    """

    def __init__(
        self,
        store: AsyncKVStore,
        config: ControlConfig | None = None,
        *,
        namespaces: Mapping[str, Namespace] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.store = store
        self.config = config if config is not None else ControlConfig()
        self.jobs = JobManager()
        self._namespaces = {store.namespace.model: store.namespace, **(namespaces or {})}
        for name, namespace in self._namespaces.items():
            store.scoped(namespace)  # raises ConfigError for a namespace the store cannot serve
            if not name:
                raise ConfigError("namespace names must not be empty")
        env = os.environ if environ is None else environ
        self._salts: dict[str, str] = {}
        for tenant in self.config.tenants:
            salt = secret_value(tenant.salt, tenant.salt_env, f"tenant {tenant.name} salt", env)
            if salt is None:
                raise ConfigError(f"tenant {tenant.name} has no salt")
            self._salts[tenant.name] = salt
        if len(set(self._salts.values())) != len(self._salts):
            raise ConfigError("tenant salts must differ from each other")
        self._tokenizers: dict[str, Any] = {}

    @property
    def namespaces(self) -> dict[str, Namespace]:
        return dict(self._namespaces)

    # ------------------------------------------------------------- scoping

    def _tenant(self, principal: Principal, requested: str | None) -> str | None:
        """The tenant a request acts for: a tenant's own, or the one the admin names."""
        if not principal.admin:
            if requested is not None and requested != principal.tenant:
                raise PermissionDeniedError("a tenant's token acts for that tenant only")
            return principal.tenant
        if requested is not None and requested not in self._salts:
            raise NotFoundError(f"no tenant named {requested!r}")
        return requested

    def _namespace(self, model: str | None) -> tuple[str, Namespace]:
        name = self.store.namespace.model if model is None else model
        namespace = self._namespaces.get(name)
        if namespace is None:
            raise NotFoundError(f"no namespace {name!r} (known: {sorted(self._namespaces)})")
        return name, namespace

    def _view(
        self, principal: Principal, model: str | None, tenant: str | None
    ) -> tuple[str, AsyncKVStore]:
        """The store as the caller may see it: the named namespace, under the tenant's salt."""
        acting = self._tenant(principal, tenant)
        name, namespace = self._namespace(model)
        if acting is not None:
            namespace = dataclasses.replace(namespace, tenant=self._salts[acting])
        view = self.store if namespace == self.store.namespace else self.store.scoped(namespace)
        return name, view

    def _scope(self, principal: Principal, scope: ScopeName | None) -> ScopeName | None:
        if not principal.admin:
            if scope == "all":
                raise PermissionDeniedError("a tenant may clear, move or compress its own chunks")
            return scope or "tenant"
        return scope

    async def _tokens(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, tokenizing its text if that is what it gave."""
        selected = await self._selected(prompt)
        if selected is None:
            raise InvalidArgumentError("give exactly one of tokens and text")
        return selected

    async def _selected(self, request: Prompt | MoveRequest | CompressRequest) -> list[int] | None:
        """The request's token ids (tokenizing its text), or None when it names no prompt."""
        if request.tokens is not None:
            return request.tokens
        text = request.text
        if text is None:
            return None
        _, namespace = self._namespace(request.model)
        tokenizer = await self._tokenizer(namespace.model)
        ids = await asyncio.to_thread(lambda: tokenizer(text)["input_ids"])
        return [int(token) for token in ids]

    @staticmethod
    def _check_tiers(view: AsyncKVStore, *names: str | None) -> None:
        """NotFoundError for a tier name the store does not have, before a job starts."""
        known = [tier.name for tier in view.tiers]
        for name in names:
            if name is not None and name not in known:
                raise NotFoundError(f"no tier named {name!r} (tiers: {known})")

    async def _tokenizer(self, model: str) -> Any:
        """The tokenizer of ``model``, loaded once from local files (never downloaded)."""
        if model not in self._tokenizers:
            source = self.config.tokenizers.get(model, model)
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise NotSupportedError(
                    "lookups by text need transformers (pip install 'kvstore-llm[hf]')"
                ) from None
            try:
                self._tokenizers[model] = await asyncio.to_thread(
                    AutoTokenizer.from_pretrained, source, local_files_only=True
                )
            except (OSError, ValueError) as exc:
                raise NotFoundError(
                    f"no local tokenizer for {model!r} at {source!r}: {exc}"
                ) from None
        return self._tokenizers[model]

    # ---------------------------------------------------------- operations

    async def lookup(self, request: LookupRequest, principal: Principal = ADMIN) -> LookupReply:
        """How many leading tokens of the prompt are cached, and in which tier each chunk is."""
        name, view = self._view(principal, request.model, request.tenant)
        result = await view.lookup(await self._tokens(request))
        return LookupReply(
            model=name,
            tokens=result.tokens,
            chunk_tokens=view.chunk_tokens,
            chunks=list(result.chunk_tiers),
        )

    async def pin(self, request: PinRequest, principal: Principal = ADMIN) -> PinReply:
        """Pin the prompt's cached prefix, until ``ttl_s`` runs out if given."""
        _, view = self._view(principal, request.model, request.tenant)
        tokens = await self._tokens(request)
        return PinReply(chunks=await view.pin(tokens, ttl_s=request.ttl_s))

    async def unpin(self, request: UnpinRequest, principal: Principal = ADMIN) -> PinReply:
        """Unpin every chunk of the prompt."""
        _, view = self._view(principal, request.model, request.tenant)
        return PinReply(chunks=await view.unpin(await self._tokens(request)))

    async def clear(self, request: ClearRequest, principal: Principal = ADMIN) -> JobInfo:
        """Start a job deleting the scope's chunks from one tier or all."""
        _, view = self._view(principal, request.model, request.tenant)
        scope = self._scope(principal, request.scope)
        self._check_tiers(view, request.tier)

        async def run(progress: Any) -> _Deleted:
            return _Deleted(await view.clear(request.tier, scope=scope, progress=progress))

        return self.jobs.start("clear", principal.tenant, run).info()

    async def move(self, request: MoveRequest, principal: Principal = ADMIN) -> JobInfo:
        """Start a job copying or migrating chunks between two tiers."""
        _, view = self._view(principal, request.model, request.tenant)
        scope = self._scope(principal, request.scope)
        self._check_tiers(view, request.source, request.target)
        tokens = await self._selected(request)

        async def run(progress: Any) -> Any:
            return await view.move(
                request.source,
                request.target,
                tokens,
                migrate=request.mode == "migrate",
                scope=scope,
                progress=progress,
            )

        return self.jobs.start("move", principal.tenant, run).info()

    async def compress(self, request: CompressRequest, principal: Principal = ADMIN) -> JobInfo:
        """Start a job re-encoding a tier's chunks with another lossless codec stack."""
        _, view = self._view(principal, request.model, request.tenant)
        scope = self._scope(principal, request.scope)
        self._check_tiers(view, request.tier)
        view.lossless_stack(request.codecs)
        tokens = await self._selected(request)

        async def run(progress: Any) -> Any:
            return await view.compress(
                request.tier, request.codecs, tokens, scope=scope, progress=progress
            )

        return self.jobs.start("compress", principal.tenant, run).info()

    async def health(self, principal: Principal = ADMIN, timeout_s: float = 5.0) -> HealthReply:
        """Probe every tier; a tenant sees only its own entries and bytes."""
        tiers = await self.store.health(timeout_s)
        usage = None if principal.admin else self._view(principal, None, None)[1].scope_stats()
        infos = []
        for position, tier in enumerate(tiers):
            entries, used = tier.entries, tier.used_bytes
            if usage is not None:
                entries, used = usage.tiers[position].entries, usage.tiers[position].used_bytes
            infos.append(
                TierHealthInfo(
                    name=tier.name,
                    reachable=tier.reachable,
                    latency_ms=tier.latency_s * 1000,
                    error=tier.error,
                    errors=tier.errors,
                    error_rate=tier.error_rate,
                    entries=entries,
                    used_bytes=used,
                    capacity_bytes=tier.capacity_bytes,
                )
            )
        return HealthReply(ok=all(info.reachable for info in infos), tiers=infos)

    async def stats(self, principal: Principal = ADMIN, tenant: str | None = None) -> StatsReply:
        """Usage and counters: the whole store for the admin, a tenant's own scope for a tenant
        (or for the admin naming a tenant)."""
        _, view = self._view(principal, None, tenant)
        acting = self._tenant(principal, tenant)
        scoped = view.scope_stats("tenant" if acting is not None else "all")
        counters = Counters(**dataclasses.asdict(scoped.counters))
        if acting is not None:
            return StatsReply(
                scope=scoped.scope,
                tiers=[TierUsage(**dataclasses.asdict(tier)) for tier in scoped.tiers],
                counters=counters,
                queued_bytes=None,
                pinned_chunks=sum(tier.pinned for tier in scoped.tiers),
            )
        stats = self.store.stats()
        tiers = []
        for tier in stats.tiers:
            counts = tier.stats
            tiers.append(
                TierUsage(
                    name=tier.name,
                    entries=tier.entries,
                    used_bytes=tier.used_bytes,
                    capacity_bytes=tier.capacity_bytes,
                    pinned=tier.pinned,
                    hits=counts.hits,
                    misses=counts.misses,
                    bytes_read=counts.bytes_read,
                    bytes_written=counts.bytes_written,
                    evictions=counts.evictions,
                    integrity_failures=counts.integrity_failures,
                    dropped_writes=counts.dropped_writes,
                    errors=dict(counts.errors),
                )
            )
        return StatsReply(
            scope="all",
            tiers=tiers,
            counters=counters,
            queued_bytes=stats.queued_bytes,
            pinned_chunks=stats.pinned_chunks,
        )

    # ---------------------------------------------------------------- jobs

    def job(self, job_id: str, principal: Principal = ADMIN) -> JobInfo:
        return self.jobs.get(job_id, principal.tenant, admin=principal.admin).info()

    def job_list(self, principal: Principal = ADMIN) -> JobList:
        jobs = self.jobs.visible(principal.tenant, admin=principal.admin)
        return JobList(jobs=[job.info() for job in jobs])

    async def cancel(self, job_id: str, principal: Principal = ADMIN) -> JobInfo:
        """Cancel a running job (a finished one is left as it is) and report its state."""
        job = self.jobs.get(job_id, principal.tenant, admin=principal.admin)
        await self.jobs.cancel(job)
        return job.info()

    async def wait(self, job_id: str, principal: Principal = ADMIN) -> JobInfo:
        """Wait for a job to finish and report it."""
        job = self.jobs.get(job_id, principal.tenant, admin=principal.admin)
        if job.task is not None:
            await asyncio.gather(job.task, return_exceptions=True)
        return job.info()

    async def close(self) -> None:
        """Cancel running jobs; the store stays open (its owner closes it)."""
        await self.jobs.close()


@dataclasses.dataclass(frozen=True)
class _Deleted:
    deleted: int
