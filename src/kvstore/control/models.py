"""Requests and replies of the control API, shared by the Python API, HTTP and the CLI.

Every field is validated here once (pydantic), whichever way a request comes
in; the HTTP server's OpenAPI spec is generated from these models.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.config import JsonDict

MAX_TOKENS = 1 << 20
"""The most token ids one request may carry."""
MAX_TEXT = 4 << 20
"""The most characters of text one request may carry."""

TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
ScopeName = Literal["namespace", "tenant", "all"]
JobState = Literal["running", "succeeded", "failed", "cancelled"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_TOKENS_GIVEN: JsonDict = {"required": ["tokens"], "properties": {"tokens": {"type": "array"}}}
_TEXT_GIVEN: JsonDict = {"required": ["text"], "properties": {"text": {"type": "string"}}}


class Prompt(_Model):
    """A prompt given as token ids or as text (tokenized with the model's tokenizer).

    model: the namespace to use, by name (a model name unless the server was
        given other names); default: the store's own.
    tenant: act for this tenant (admin only; a tenant's token always acts
        for its own tenant).
    """

    model_config = ConfigDict(json_schema_extra={"oneOf": [_TOKENS_GIVEN, _TEXT_GIVEN]})

    tokens: list[TokenId] | None = Field(default=None, max_length=MAX_TOKENS)
    text: str | None = Field(default=None, max_length=MAX_TEXT)
    model: Name | None = None
    tenant: Name | None = None

    @model_validator(mode="after")
    def _tokens_or_text(self) -> Prompt:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of tokens and text")
        return self


class LookupRequest(Prompt):
    """How much of a prompt is cached, and where."""


class PinRequest(Prompt):
    """Pin a prompt's cached prefix; ``ttl_s`` drops the pin after that many seconds."""

    ttl_s: float | None = Field(default=None, gt=0, le=365 * 24 * 3600)


class UnpinRequest(Prompt):
    """Unpin every chunk of a prompt."""


class _Scoped(_Model):
    """Which chunks a tier-wide operation touches.

    scope: ``namespace`` (one model's), ``tenant`` (every namespace of the
        tenant) or ``all`` (everything in the tiers; admin only). Default:
        ``tenant`` for a tenant, else ``all``.
    """

    scope: ScopeName | None = None
    model: Name | None = None
    tenant: Name | None = None


class ClearRequest(_Scoped):
    """Delete the chunks of a scope from one tier, or from every tier."""

    tier: Name | None = None


class _Selection(_Scoped):
    """Chunks of one prompt (``tokens`` or ``text``), or else every chunk of the scope."""

    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["tokens", "text"],
                "properties": {"tokens": {"type": "array"}, "text": {"type": "string"}},
            }
        }
    )

    tokens: list[TokenId] | None = Field(default=None, max_length=MAX_TOKENS)
    text: str | None = Field(default=None, max_length=MAX_TEXT)

    @model_validator(mode="after")
    def _not_both(self) -> _Selection:
        if self.tokens is not None and self.text is not None:
            raise ValueError("give at most one of tokens and text")
        return self


class MoveRequest(_Selection):
    """Copy (``copy``) or move (``migrate``) chunks from ``source`` to ``target``."""

    source: Name
    target: Name
    mode: Literal["copy", "migrate"] = "copy"


class CompressRequest(_Selection):
    """Re-encode chunks of ``tier`` with the lossless codec stack ``codecs`` (``zstd:9``)."""

    tier: Name
    codecs: Annotated[str, Field(min_length=1, max_length=256)]


class LookupReply(_Model):
    """``tokens``: the cached prefix in tokens; ``chunks``: the tier of each of its chunks."""

    model: str
    tokens: int
    chunk_tokens: int
    chunks: list[str]


class PinReply(_Model):
    """Chunks pinned (or unpinned)."""

    chunks: int


class ErrorBody(_Model):
    """A failed request: the error's type (kvstore's taxonomy) and message."""

    error: str
    message: str


class JobInfo(_Model):
    """A long operation: its state, its progress and, once done, its result or error."""

    id: str
    kind: Literal["clear", "move", "compress"]
    tenant: str | None
    state: JobState
    done_chunks: int
    total_chunks: int
    done_bytes: int
    total_bytes: int
    result: dict[str, int] | None
    error: ErrorBody | None
    created_at: float
    finished_at: float | None


class JobList(_Model):
    jobs: list[JobInfo]


class TierHealthInfo(_Model):
    """One tier's health: ``used_bytes``/``entries`` are the caller's scope only for a tenant."""

    name: str
    reachable: bool
    latency_ms: float
    error: str | None
    errors: int
    error_rate: float
    entries: int
    used_bytes: int
    capacity_bytes: int


class HealthReply(_Model):
    ok: bool
    tiers: list[TierHealthInfo]


class TierUsage(_Model):
    """What a tier holds of the caller's scope; the counters are set for the admin only."""

    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    pinned: int
    hits: int | None = None
    misses: int | None = None
    bytes_read: int | None = None
    bytes_written: int | None = None
    evictions: int | None = None
    integrity_failures: int | None = None
    dropped_writes: int | None = None
    errors: dict[str, int] | None = None


class Counters(_Model):
    """Lookups and retrieves of the scope's namespaces since the store opened."""

    lookups: int
    lookup_tokens: int
    hit_tokens: int
    retrieves: int
    retrieved_tokens: int


class StatsReply(_Model):
    """Per-tier usage and counters of the caller's scope (``all`` for the admin)."""

    scope: ScopeName
    tiers: list[TierUsage]
    counters: Counters
    queued_bytes: int | None
    pinned_chunks: int
