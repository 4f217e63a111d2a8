"""Persistence across processes: what one process writes, another one reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from hashlib import sha256
from typing import Any, ClassVar

from ..harness import DriverHarness, assert_values
from .base import DriverTestBase
from .persistence import require_persistent

OTHER_PROCESS = """
import asyncio, hashlib, importlib, json, sys

async def main(target, url, request):
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    driver = await cls.open(cls.config_type.from_url(url))
    try:
        keys = [bytes.fromhex(key) for key in request["read"]]
        digests = [
            None if value is None else hashlib.sha256(value).hexdigest()
            for value in await driver.get_many(keys)
        ]
        await driver.put_many([(bytes.fromhex(request["write"]), bytes.fromhex(request["value"]))])
        deleted = await driver.delete_many([bytes.fromhex(request["delete"])])
    finally:
        await driver.close()
    return {"digests": digests, "deleted": deleted}

request = json.loads(sys.stdin.read())
print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], request))))
"""
"""Opens the driver class on the URL in a fresh interpreter, reads, writes and deletes."""


class ProcessPersistenceTests(DriverTestBase):
    """Drivers with ``persistent=True``: values survive into another process that
    opens the same config, and what that process writes and deletes is seen here."""

    conformance_area: ClassVar[str] = "persistence"

    def test_values_survive_into_another_process(self, harness: DriverHarness) -> None:
        require_persistent(harness)
        keys = harness.keys(3, "here")
        values = [harness.value(size) for size in (0, 777, 70_000)]
        harness.put(list(zip(keys, values)))
        written, written_value = harness.key("there"), harness.value(5000)
        harness.run(harness.driver.close())
        reply = self._other_process(
            harness,
            {
                "read": [key.hex() for key in keys],
                "write": written.hex(),
                "value": written_value.hex(),
                "delete": keys[0].hex(),
            },
        )
        expected = [sha256(value).hexdigest() for value in values]
        assert reply["digests"] == expected, (
            "values persist across processes: another process read other bytes "
            "(sha256 of what it read vs of what was written)"
        )
        assert reply["deleted"] == [True], "another process could not delete a persisted key"
        harness.reopen()
        assert_values(
            harness.get([*keys, written]),
            [None, *values[1:], written_value],
            "values after another process wrote and deleted",
        )

    def _other_process(
        self, harness: DriverHarness, request: dict[str, object]
    ) -> dict[str, list[Any]]:
        cls = type(harness.driver)
        target = f"{cls.__module__}:{cls.__qualname__}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        result = subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS, target, harness.config.to_url()],
            input=json.dumps(request),
            env=env,
            capture_output=True,
            text=True,
            timeout=self.call_timeout_s,
        )
        assert result.returncode == 0, (
            f"another process could not open {target} on the same config: "
            f"{result.stderr.strip().splitlines()[-1:]}"
        )
        reply: dict[str, list[Any]] = json.loads(result.stdout.strip().splitlines()[-1])
        return reply
