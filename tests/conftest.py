"""Test-session setup that must happen before any test module is imported.

Without a CUDA device, Triton kernels can only run in Triton's CPU
interpreter, and ``TRITON_INTERPRET`` is read when Triton is first imported:
some test modules (transformers, vLLM helpers) import it while pytest collects,
so it is set here, ahead of all of them.
"""

from __future__ import annotations

import os

import pytest
import torch
from prerequisites import check_marked_prerequisites

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    check_marked_prerequisites(item)
