"""Copies between host tensors on the calling thread, without OpenMP.

A torch op big enough to run in parallel starts an OpenMP team on the thread
that calls it, and the team lives as long as that thread. An engine's process
already runs OpenMP teams on every core for its forward pass; one more team
puts more OpenMP threads than cores in the process, and libgomp then stops
spinning at its barriers and sleeps there instead, so every parallel region
of the engine pays for a wake-up. Measured on 2 cores: while another thread
that had run one parallel ``copy_`` stayed alive, small parallel ops on the
main thread took 1.4 to 1.5 times as long. kvstore's own long-lived threads
(codec workers, drivers) therefore copy host memory with numpy, which uses no
OpenMP and releases the GIL, and the codec workers run the torch ops they
still need (quantizing codecs, casts, device copies) serially
(``serial_torch_thread``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import threadpoolctl
import torch

_SAME_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""An integer dtype of each element size: numpy copies any dtype's bits through it."""


def copy_into(destination: torch.Tensor, source: torch.Tensor) -> None:
    """``destination.copy_(source)``: with numpy when both are host tensors of the
    same dtype and shape (any strides), else with torch (a device, a cast or
    broadcasting)."""
    if (
        destination.device.type == "cpu"
        and source.device.type == "cpu"
        and destination.dtype == source.dtype
        and destination.shape == source.shape
        and destination.element_size() in _SAME_SIZE
    ):
        np.copyto(_bits(destination), _bits(source))
    else:
        destination.copy_(source)


def _bits(tensor: torch.Tensor) -> npt.NDArray[np.generic]:
    """A numpy view of ``tensor``'s elements as same-sized integers (any strides)."""
    return tensor.detach().view(_SAME_SIZE[tensor.element_size()]).numpy()


def serial_torch_thread() -> None:
    """Torch ops on the calling thread run serially from now on, with no OpenMP
    team: its OpenMP thread count (a per-thread setting) becomes 1, the
    process's and other threads' stay as they are. A pool's initializer.

    Torch sets a thread's count on the thread's first op, to the process's
    count once anything has called ``torch.set_num_threads`` (an engine
    does): that first op runs here, before the count is set to 1."""
    torch.get_num_threads()
    threadpoolctl.threadpool_limits(1, user_api="openmp")
