"""The ``redis`` and ``rediss`` (TLS) driver plugins (docs/drivers/redis.md)."""

from kvstore.registry import DriverInfo, hookimpl


class RedisPlugin:
    """One plugin object per scheme; both load the same driver module lazily."""

    def __init__(self, scheme: str, class_name: str, summary: str) -> None:
        self.info = DriverInfo(
            scheme=scheme,
            target=f"kvstore.drivers.redis.driver:{class_name}",
            summary=summary,
            install_hint="kvstore-llm[redis]",
        )

    @hookimpl
    def kvstore_driver(self) -> DriverInfo:
        return self.info


redis_plugin = RedisPlugin("redis", "RedisDriver", "Redis or Redis Cluster through redis-py")
rediss_plugin = RedisPlugin("rediss", "RedissDriver", "Redis or Redis Cluster over TLS")
