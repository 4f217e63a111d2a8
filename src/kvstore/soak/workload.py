"""The soak's workload: chat sessions over Zipf-popular shared prefixes, and their KV.

Each worker process serves its own session slots. A session opens with one
of ``prefixes`` shared system prompts, picked by a Zipf law (a few prompts
are most of the traffic, as in a real deployment), then grows by one or two
chunks a turn; after ``max_turns`` it ends and its slot starts a new session.
Slots are picked by a Zipf law too, so some sessions come back often and
others rarely. Every length is a whole number of chunks.

Token ids and KV are deterministic: tokens come from seeded generators, and
the KV of chunk ``i`` of a prompt is ``blake3(tag || int32 tokens[0 : (i+1)
* chunk_tokens])`` extended to the chunk's size, a function of the whole
prefix like real KV. So any process can recompute what a retrieved chunk
must hold, independently of kvstore's own keys, and a wrong byte is caught
exactly.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import blake3
import numpy as np
import torch

from kvstore.layout import KVLayout

KV_TAG = b"kvstore-soak-kv-v1\n"
VOCAB = 128_000


def zipf_weights(count: int, exponent: float) -> list[float]:
    """Cumulative weights of ranks ``0 .. count-1`` under a Zipf law (rank 0 most popular)."""
    return list(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(count)))


@dataclass(frozen=True)
class WorkloadSpec:
    """What every worker's trace is made of (the same in every process).

    prefixes: shared system prompts; prefix ``j`` is 2 to 8 chunks long.
    slots: session slots of one worker (its concurrent conversations).
    max_turns: turns before a session ends and its slot starts a new one.
    zipf: the Zipf exponent of prefix and slot popularity.
    """

    seed: int
    layout: KVLayout
    chunk_tokens: int
    prefixes: int
    slots: int
    max_turns: int = 6
    zipf: float = 1.1

    def prefix_chunks(self, prefix: int) -> int:
        return 2 + (prefix * 5) % 7

    def prefix_tokens(self, prefix: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, prefix])
        count = self.prefix_chunks(prefix) * self.chunk_tokens
        return rng.integers(0, VOCAB, count, dtype=np.int32)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        return self.layout.shape(self.chunk_tokens)

    @property
    def chunk_nbytes(self) -> int:
        return self.layout.nbytes(self.chunk_tokens)


@dataclass(frozen=True)
class Request:
    """One turn of one session: the prompt is the shared prefix then the session so far.

    ``chunk_ids`` name its chunks for the ideal-LRU replay: ``p<prefix>.<i>``
    for shared-prefix chunks, ``s<session>.<i>`` for the session's own.
    """

    prefix: int
    prefix_chunks: int
    session: str
    session_chunks: int
    tokens: np.ndarray

    @property
    def chunks(self) -> int:
        return self.prefix_chunks + self.session_chunks

    def chunk_ids(self) -> list[str]:
        return chunk_ids(self.prefix, self.prefix_chunks, self.session, self.session_chunks)


def chunk_ids(prefix: int, prefix_chunks: int, session: str, session_chunks: int) -> list[str]:
    """The chunk names of a request (see ``Request``)."""
    return [f"p{prefix}.{i}" for i in range(prefix_chunks)] + [
        f"s{session}.{i}" for i in range(session_chunks)
    ]


@dataclass
class _Session:
    name: str
    prefix: int
    turn_chunks: list[int]
    tokens: np.ndarray
    turn: int = 0


class WorkerTrace:
    """The endless request stream of one worker incarnation, deterministic in
    (seed, worker, incarnation). Sessions of an incarnation are new ones: a
    restarted worker's conversations start over, as an engine's would."""

    def __init__(self, spec: WorkloadSpec, worker: int, incarnation: int) -> None:
        self.spec = spec
        self.worker = worker
        self.incarnation = incarnation
        self._rng = random.Random(f"{spec.seed}-{worker}-{incarnation}")
        self._prefix_weights = zipf_weights(spec.prefixes, spec.zipf)
        self._slot_weights = zipf_weights(spec.slots, spec.zipf)
        self._sessions: dict[int, _Session] = {}
        self._started = 0
        self._prefix_tokens = [spec.prefix_tokens(j) for j in range(spec.prefixes)]

    def _new_session(self) -> _Session:
        spec = self.spec
        name = f"{self.worker}.{self.incarnation}.{self._started}"
        self._started += 1
        prefix = self._rng.choices(range(spec.prefixes), cum_weights=self._prefix_weights)[0]
        turns = [self._rng.choice((1, 2)) for _ in range(spec.max_turns)]
        rng = np.random.default_rng([spec.seed, 2, self.worker, self.incarnation, self._started])
        tokens = rng.integers(0, VOCAB, sum(turns) * spec.chunk_tokens, dtype=np.int32)
        return _Session(name, prefix, turns, tokens)

    def next_request(self) -> Request:
        slot = self._rng.choices(range(self.spec.slots), cum_weights=self._slot_weights)[0]
        session = self._sessions.get(slot)
        if session is None or session.turn == self.spec.max_turns:
            session = self._sessions[slot] = self._new_session()
        session.turn += 1
        own = sum(session.turn_chunks[: session.turn])
        prefix_tokens = self._prefix_tokens[session.prefix]
        tokens = np.concatenate([prefix_tokens, session.tokens[: own * self.spec.chunk_tokens]])
        return Request(
            prefix=session.prefix,
            prefix_chunks=len(prefix_tokens) // self.spec.chunk_tokens,
            session=session.name,
            session_chunks=own,
            tokens=tokens,
        )


def expected_kv(spec: WorkloadSpec, tokens: np.ndarray) -> torch.Tensor:
    """The KV every whole chunk of ``tokens`` must hold: ``[layers, 2, n, heads, dim]``."""
    ct = spec.chunk_tokens
    chunks = len(tokens) // ct
    kv = torch.empty(spec.layout.shape(chunks * ct), dtype=spec.layout.torch_dtype)
    hasher = blake3.blake3(KV_TAG)
    for i in range(chunks):
        hasher.update(tokens[i * ct : (i + 1) * ct].astype("<i4").tobytes())
        content = bytearray(hasher.copy().digest(length=spec.chunk_nbytes))
        chunk = torch.frombuffer(content, dtype=torch.uint8).view(spec.layout.torch_dtype)
        kv[:, :, i * ct : (i + 1) * ct] = chunk.view(spec.chunk_shape)
    return kv


def wrong_chunks(spec: WorkloadSpec, served: torch.Tensor, expected: torch.Tensor) -> int:
    """How many chunks of ``served`` (a prefix of ``expected``) differ in any bit."""
    ct = spec.chunk_tokens
    wrong = 0
    for i in range(served.shape[2] // ct):
        got = served[:, :, i * ct : (i + 1) * ct].contiguous().view(torch.uint8)
        want = expected[:, :, i * ct : (i + 1) * ct].contiguous().view(torch.uint8)
        if not torch.equal(got, want):
            wrong += 1
    return wrong
