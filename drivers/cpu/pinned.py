"""Host memory for the cpu driver's arena: one anonymous mapping, page-locked.

A shared arena is a memfd mapped ``MAP_SHARED`` instead: its file descriptor
(``HostMemory.fd``) can be handed to other processes (over a Unix socket),
which map the same pages; the node service lends its arena this way.

Page-locked (pinned) memory cannot be swapped out, and CUDA copies between it
and a GPU run by DMA at full bus speed. With a CUDA device the mapping is
registered with the CUDA driver (``cudaHostRegister``, the call behind torch's
own ``pin_memory``); without one it is locked with ``mlock(2)``, which
``RLIMIT_MEMLOCK`` may forbid. ``HostMemory.pinning`` says what took effect.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import resource
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

from kvstore.errors import DriverUnavailableError
from kvstore.sizes import human_size

PinMethod = Literal["auto", "cuda", "mlock", "none"]

_CUDA_HOST_REGISTER_PORTABLE = 1
"""Pinned for every CUDA context in the process, not only the current device's."""

logger = logging.getLogger(__name__)


class HostMemory:
    """A mapping of ``size`` bytes, seen as a uint8 array: anonymous and private,
    or, when shared, of a memfd whose descriptor is ``fd``.

    ``pinning`` is what is in effect: ``cuda``, ``mlock``, ``none`` (asked
    for), or ``none: <why pinning failed>``.
    """

    def __init__(self, mapping: mmap.mmap, pinning: str, unpin: Callable[[], None] | None) -> None:
        self._mapping = mapping
        self.array: npt.NDArray[np.uint8] = np.frombuffer(mapping, dtype=np.uint8)
        self.pinning = pinning
        self._unpin = unpin
        self.fd: int | None = None

    @classmethod
    def allocate(
        cls, size: int, pin: PinMethod, driver: str, *, shared: bool = False
    ) -> HostMemory:
        """Map ``size`` bytes (``shared``: of a new memfd) and pin them by ``pin``.

        ``auto`` tries CUDA registration where a CUDA device exists, then mlock,
        then settles for pageable memory and logs a warning; an explicitly
        requested method that fails raises DriverUnavailableError.
        """
        fd = _shared_file(size, driver) if shared else None
        if fd is None:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        _advise_huge_pages(mapping)
        address = int(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)
        try:
            memory = cls._pin(mapping, address, size, pin, driver)
        except BaseException:
            mapping.close()
            if fd is not None:
                os.close(fd)
            raise
        memory.fd = fd
        return memory

    @classmethod
    def _pin(
        cls, mapping: mmap.mmap, address: int, size: int, pin: PinMethod, driver: str
    ) -> HostMemory:
        if pin == "none":
            return cls(mapping, "none", None)
        failures: list[str] = []
        if pin in ("auto", "cuda"):
            if _cuda_available():
                try:
                    _cuda_register(address, size)
                    return cls(mapping, "cuda", lambda: _cuda_unregister(address))
                except OSError as exc:
                    if pin == "cuda":
                        raise DriverUnavailableError(
                            f"pin=cuda: cudaHostRegister failed: {exc}", driver=driver
                        ) from exc
                    failures.append(f"cudaHostRegister failed: {exc}")
            elif pin == "cuda":
                raise DriverUnavailableError(
                    "pin=cuda needs torch with a CUDA device, and none is available; "
                    "use pin=auto or pin=mlock",
                    driver=driver,
                )
        try:
            _mlock(address, size)
            return cls(mapping, "mlock", lambda: _munlock(address, size))
        except OSError as exc:
            if pin == "mlock":
                raise DriverUnavailableError(f"pin=mlock: {exc}", driver=driver) from exc
            failures.append(f"mlock failed: {exc}")
        pinning = "none: " + "; ".join(failures)
        logger.warning(
            "%s: the %s arena is pageable, not pinned (%s)", driver, human_size(size), pinning
        )
        return cls(mapping, pinning, None)

    def release(self) -> None:
        """Unpin and unmap. Array views still alive keep the mapping until they go."""
        if self._unpin is not None:
            self._unpin()
            self._unpin = None
        self.array = np.empty(0, dtype=np.uint8)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        try:
            self._mapping.close()
        except BufferError:
            logger.debug("arena views are still alive; the mapping goes with the last of them")


def _shared_file(size: int, driver: str) -> int:
    """A memfd of ``size`` bytes, not inherited across exec."""
    try:
        fd = os.memfd_create("kvstore-cpu-arena", os.MFD_CLOEXEC)
    except (AttributeError, OSError) as exc:
        raise DriverUnavailableError(
            f"shared=true needs memfd_create: {exc}", driver=driver
        ) from exc
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise DriverUnavailableError(
            f"shared=true: sizing the arena failed: {exc}", driver=driver
        ) from exc
    return fd


def _advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages: fewer page faults and TLB misses on big copies."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:
            logger.debug("transparent huge pages are not available for the arena")


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mlock", "munlock"):
        function = getattr(libc, name)
        function.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        function.restype = ctypes.c_int
    return libc


def _mlock(address: int, size: int) -> None:
    if _libc().mlock(address, size) != 0:
        errno = ctypes.get_errno()
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else human_size(soft)
        raise OSError(errno, f"{os.strerror(errno)} (RLIMIT_MEMLOCK is {limit}; see ulimit -l)")


def _munlock(address: int, size: int) -> None:
    _libc().munlock(address, size)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_register(address: int, size: int) -> None:
    import torch

    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    status = int(cudart.cudaHostRegister(address, size, _CUDA_HOST_REGISTER_PORTABLE))
    if status != 0:
        raise OSError(f"CUDA error {status}")


def _cuda_unregister(address: int) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
