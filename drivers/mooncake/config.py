"""The mooncake driver's URL grammar and settings: ``mooncake://master:port?options``."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from kvstore.config_url import DriverConfig
from kvstore.sizes import ByteSize

from .client import PAD


class MooncakeConfig(DriverConfig):
    """How to reach a Mooncake store and what this client brings to it.

    master: the master's RPC address, ``host:port`` (the URL's location).
    metadata: the transfer engine's metadata service: ``P2PHANDSHAKE`` (none
        needed), ``http://host:port/metadata`` or ``etcd://host:port``.
    protocol: ``tcp``, or ``rdma`` on hosts with RDMA NICs.
    device_name: RDMA devices to use (``mlx5_0,mlx5_1``); empty picks them.
    local_hostname: the address other clients reach this one at; by default
        the address of the interface that routes to the master.
    global_segment_size: memory this client mounts into the cluster's pool
        (0: a pure client that stores into other clients' segments).
    local_buffer_size: this client's registered buffer; staging leases come
        from it, so it bounds the largest value and the bytes in flight.
    replicas: memory replicas of each value.
    prefix: prepended to every object name, so stores can share a cluster.
    max_value: largest value accepted (also capped by the buffer and segment).
    io_threads: worker threads making blocking client calls.
    op_timeout: seconds a call may take before DriverTimeoutError.
    connect_timeout: seconds ``open`` waits for the client to set up.
    lease_wait: seconds ``delete_many`` retries keys held by read leases
        (the master's ``default_kv_lease_ttl``, 10 s unless set) before
        TransientError.
    force_delete: delete leased objects at once (unsafe for readers in other
        processes mid-transfer).
    metrics_port: the master's metrics port (its ``--metrics_port``), read by
        ``usage``; ``None``: usage is not supported.
    linger: seconds a client no open driver uses stays set up for the next one
        (drivers of one process and connection settings share a client).
    """

    scheme: ClassVar[str] = "mooncake"
    location_field: ClassVar[str | None] = "master"

    master: str
    metadata: str = Field(default="P2PHANDSHAKE", min_length=1)
    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    local_hostname: str | None = None
    global_segment_size: ByteSize = 1 << 30
    local_buffer_size: Annotated[ByteSize, Field(ge=1 << 20)] = 256 << 20
    replicas: int = Field(default=1, ge=1, le=64)
    prefix: str = "kvstore/"
    max_value: Annotated[ByteSize, Field(gt=0)] | None = None
    io_threads: int = Field(default=4, ge=1, le=256)
    op_timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=30.0, gt=0)
    lease_wait: float = Field(default=11.0, ge=0)
    force_delete: bool = False
    metrics_port: int | None = Field(default=9003, ge=1, le=65535)
    linger: float = Field(default=10.0, ge=0)

    @field_validator("master")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"the master must be host:port, got {value!r}")
        return value

    @field_validator("local_hostname", "max_value", "metrics_port", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """``option=`` in a URL (how ``to_url`` writes ``None``) means unset."""
        return None if value == "" else value

    @property
    def master_host(self) -> str:
        return self.master.rpartition(":")[0].strip("[]")

    @property
    def group_bytes(self) -> int:
        """Bytes of values one batch call moves: half the buffer over the threads, so
        every thread can hold a staging lease with room to spare."""
        return max(1, self.local_buffer_size // (2 * self.io_threads))

    @property
    def value_limit(self) -> int:
        """The largest value: it must fit a lease and, if this client mounts memory, its segment."""
        limits = [self.local_buffer_size - PAD]
        if self.global_segment_size:
            limits.append(self.global_segment_size - PAD)
        if self.max_value is not None:
            limits.append(self.max_value)
        return max(0, min(limits))
