"""One request's load or save, as the scheduler side plans it for the workers.

Plain data without vLLM, so the worker's loads and saves can run (and be
tested) without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """Save the whole chunks of ``token_ids`` from ``start`` on (the chunks before
    it are stored already), out of ``block_ids`` (the request's blocks from its
    first token): layer by layer during this step's forward, or all layers at
    once for a finished request."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    finished: bool


__all__ = ["LoadSpec", "SaveSpec"]
