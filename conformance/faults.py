"""Fault injection: a driver wrapper that misbehaves on purpose, per a seeded plan.

``FaultyDriver.wrap(inner, plan)`` behaves exactly like ``inner`` except on the
calls its ``FaultPlan`` picks, where it raises a typed error, hangs, or hands
back corrupted or truncated values. It is a ``Driver`` in its own right (scheme
``faulty``, capabilities forwarded from ``inner`` but for ``in_process``), so it can be a tier of a
hierarchical store, which must turn every such fault into a miss. One plan per
wrapper; wrap a wrapper to combine faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator
from typing_extensions import Self

from kvstore.config_url import DriverConfig
from kvstore.driver import Capabilities, Driver, KeyEntry, Usage, fill_into
from kvstore.errors import ALL_ERRORS, KVStoreError, TransientError

Operation = Literal[
    "put_many",
    "get_many",
    "lend_many",
    "borrow_many",
    "contains_many",
    "delete_many",
    "list",
    "usage",
]
OPERATIONS: tuple[Operation, ...] = get_args(Operation)
"""Every driver operation a plan can pick (``close`` always works)."""

FaultAction = Literal["error", "hang", "corrupt", "truncate"]
VALUE_ACTIONS: frozenset[FaultAction] = frozenset({"corrupt", "truncate"})
"""Actions that damage returned values, so they apply to ``get_many`` only."""

_KNOWN_ERRORS: tuple[type[KVStoreError], ...] = (KVStoreError, *ALL_ERRORS)
_ERRORS_BY_NAME = {cls.__name__: cls for cls in _KNOWN_ERRORS}


def _parse_operations(value: object) -> object:
    """Accept ``"get_many,put_many"`` (as in a URL) as well as any iterable of names."""
    if isinstance(value, str):
        return frozenset(part.strip() for part in value.split(",") if part.strip())
    return value


def _parse_error(value: object) -> object:
    """Accept an error class or its name (as in a URL)."""
    if isinstance(value, str):
        try:
            return _ERRORS_BY_NAME[value]
        except KeyError:
            known = ", ".join(sorted(_ERRORS_BY_NAME))
            raise ValueError(f"unknown error {value!r} (one of: {known})") from None
    return value


Operations = Annotated[
    AbstractSet[Operation],
    BeforeValidator(_parse_operations),
    PlainSerializer(lambda ops: ",".join(sorted(ops)), return_type=str, when_used="json"),
]
ErrorClass = Annotated[
    type[KVStoreError],
    BeforeValidator(_parse_error),
    PlainSerializer(lambda cls: cls.__name__, return_type=str, when_used="json"),
]


class FaultPlan(BaseModel):
    """Which calls fail and how.

    action: ``error`` raises ``error``; ``hang`` sleeps ``hang_seconds`` before
        doing the call (so a caller's timeout fires first); ``corrupt`` flips
        ``flip_bits`` distinct bits of every non-empty value ``get_many``
        returns; ``truncate`` returns the first half of each such value.
    operations: the operations the plan may fault; ``None`` means every
        operation the action applies to.
    every_nth: fault only the nth, 2nth, ... call of each picked operation.
    probability: fault a picked call with this probability, drawn from a
        ``random.Random(seed)``, so a plan fails the same calls on every run.
        Combined with ``every_nth``, both must agree.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: FaultAction = "error"
    operations: Operations | None = None
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    every_nth: int | None = Field(default=None, ge=1)
    seed: int = 0
    error: ErrorClass = TransientError
    hang_seconds: float = Field(default=3600.0, gt=0.0)
    flip_bits: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _value_actions_need_get_many(self) -> Self:
        if (
            self.action in VALUE_ACTIONS
            and self.operations is not None
            and not self.operations <= {"get_many"}
        ):
            raise ValueError(f"{self.action} faults apply to get_many only")
        return self

    @property
    def targets(self) -> frozenset[Operation]:
        """The operations this plan may fault."""
        if self.operations is not None:
            return frozenset(self.operations)
        if self.action in VALUE_ACTIONS:
            return frozenset({"get_many"})
        return frozenset(OPERATIONS)


class FaultyConfig(FaultPlan, DriverConfig):
    """``faulty://?inner=<url-encoded URL>&action=error&operations=get_many``:
    a fault plan and the URL of the driver it wraps."""

    scheme: ClassVar[str] = "faulty"

    inner: str


class FaultyDriver(Driver[FaultyConfig]):
    """A driver that forwards every call to ``inner`` and injects the faults of its plan.

    ``calls`` counts the calls of each operation and ``injected`` the faults
    injected into them, so a test can check that its faults really happened.
    Closing the wrapper closes ``inner``.
    """

    config_type = FaultyConfig
    forwards_loans: ClassVar[bool] = True
    """Whether ``lend_many`` and ``borrow_many`` reach the inner driver (when the plan
    spares ``put_many`` and ``get_many``); a subclass that acts on every write and
    read through those two sets it to ``False``."""
    static_capabilities = Capabilities(
        persistent=False, listable=False, details=(("capabilities", "those of the wrapped driver"),)
    )

    def __init__(self, config: FaultyConfig, inner: Driver[Any]) -> None:
        super().__init__(config)
        self.inner = inner
        self.calls: Counter[Operation] = Counter()
        self.injected: Counter[Operation] = Counter()
        self._random = random.Random(config.seed)

    @classmethod
    def wrap(cls, inner: Driver[Any], plan: FaultPlan) -> FaultyDriver:
        """Wrap an open driver; the wrapper owns it from now on."""
        config = FaultyConfig.model_validate({**dict(plan), "inner": inner.config.to_url()})
        return cls(config, inner)

    @classmethod
    async def open(cls, config: FaultyConfig) -> Self:
        """Open the inner driver from its URL through the default registry, then wrap it."""
        from kvstore.registry import default_registry

        return cls(config, await default_registry().open(config.inner))

    @property
    def plan(self) -> FaultPlan:
        return self.config

    @property
    def capabilities(self) -> Capabilities:
        """The inner driver's, less ``in_process``: values read through the wrapper
        may be damaged on the way, so a store verifies them."""
        return dataclasses.replace(self.inner.capabilities, in_process=False)

    def footprint(self, nbytes: int) -> int:
        return self.inner.footprint(nbytes)

    async def _put_many(self, items: list[tuple[bytes, memoryview]]) -> None:
        await self._inject("put_many")
        await self.inner.put_many(items)

    async def _get_many(
        self, keys: list[bytes], into: list[memoryview | None] | None
    ) -> list[memoryview | None]:
        damage = await self._inject("get_many")
        values = await self.inner.get_many(keys, into)
        if not damage:
            return values
        targets: Sequence[memoryview | None] = into if into is not None else [None] * len(keys)
        return [self._damage(value, target) for value, target in zip(values, targets)]

    def _lend_many(
        self, items: list[tuple[bytes, int]]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        """The inner driver's room, unless the plan may fault ``put_many``: then
        nothing is lent, so every write takes ``put_many`` and meets its faults."""
        if "put_many" in self.plan.targets or not self.forwards_loans:
            return super()._lend_many(items)
        return self._lend_inner(items)

    @contextlib.asynccontextmanager
    async def _lend_inner(
        self, items: list[tuple[bytes, int]]
    ) -> AsyncIterator[list[memoryview | None]]:
        await self._inject("lend_many")
        async with self.inner.lend_many(items) as rooms:
            yield rooms

    def _borrow_many(
        self, keys: list[bytes]
    ) -> AbstractAsyncContextManager[list[memoryview | None]]:
        """The inner driver's loans, unless the plan may fault ``get_many``: then
        nothing is lent, so every read takes ``get_many`` and meets its faults."""
        if "get_many" in self.plan.targets or not self.forwards_loans:
            return super()._borrow_many(keys)
        return self._borrow_inner(keys)

    @contextlib.asynccontextmanager
    async def _borrow_inner(self, keys: list[bytes]) -> AsyncIterator[list[memoryview | None]]:
        await self._inject("borrow_many")
        async with self.inner.borrow_many(keys) as views:
            yield views

    async def _contains_many(self, keys: list[bytes]) -> list[bool]:
        await self._inject("contains_many")
        return await self.inner.contains_many(keys)

    async def _delete_many(self, keys: list[bytes]) -> list[bool]:
        await self._inject("delete_many")
        return await self.inner.delete_many(keys)

    async def _list(self) -> AsyncIterator[KeyEntry]:
        await self._inject("list")
        async for entry in self.inner.list():
            yield entry

    async def _usage(self) -> Usage:
        await self._inject("usage")
        return await self.inner.usage()

    async def _close(self) -> None:
        await self.inner.close()

    def _strikes(self, operation: Operation) -> bool:
        """Count a call and decide, per the plan, whether to fault it."""
        self.calls[operation] += 1
        plan = self.plan
        if operation not in plan.targets:
            return False
        if plan.every_nth is not None and self.calls[operation] % plan.every_nth:
            return False
        if plan.probability < 1.0 and self._random.random() >= plan.probability:
            return False
        self.injected[operation] += 1
        return True

    async def _inject(self, operation: Operation) -> bool:
        """Raise or hang if the plan faults this call; True when its values must be damaged."""
        if not self._strikes(operation):
            return False
        plan = self.plan
        if plan.action == "error":
            raise plan.error(f"injected {plan.error.__name__} on {operation}", driver=self.name)
        if plan.action == "hang":
            await asyncio.sleep(plan.hang_seconds)
            return False
        return True

    def _damage(self, value: memoryview | None, target: memoryview | None) -> memoryview | None:
        """A corrupted copy or a truncated view of ``value``; never writes the inner
        driver's memory. Misses and empty values stay as they are."""
        if value is None or len(value) == 0:
            return value
        if self.plan.action == "truncate":
            return value[: len(value) // 2]
        corrupted = bytearray(value)
        bit_count = len(corrupted) * 8
        for bit in self._random.sample(range(bit_count), min(self.plan.flip_bits, bit_count)):
            corrupted[bit // 8] ^= 1 << (bit % 8)
        return fill_into(corrupted, target)
