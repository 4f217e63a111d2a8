"""The ``kvstore`` command's start-up and exit: help and argument errors come
before torch is imported, and Ctrl-C ends any command with one line and 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from kvstore.cli import INTERRUPTED_EXIT_CODE

IMPORTS_TORCH = """
import sys
from kvstore.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""
"""Runs the CLI and says whether torch got imported."""


def cli_in_fresh_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", IMPORTS_TORCH, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_does_not_import_torch() -> None:
    result = cli_in_fresh_process("--help")
    assert result.returncode == 0, result.stderr
    assert "conformance" in result.stdout
    assert "torch imported: False" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--context", "10"],
        ["demo", "--requests", "0"],
        ["demo", "--model-size", "huge"],
        ["bench", "--layout", "no-such-model"],
        ["bench", "codecs", "--dtype", "int3"],
        ["conformance"],
    ],
)
def test_argument_errors_come_before_torch(args: list[str]) -> None:
    result = cli_in_fresh_process(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "torch imported: False" in result.stdout
    assert "Traceback" not in result.stderr


def test_bench_options_name_the_bench_layouts() -> None:
    from kvstore.bench.options import LAYOUT_NAMES
    from kvstore.bench.rows import LAYOUTS

    assert tuple(LAYOUTS) == LAYOUT_NAMES


@pytest.mark.parametrize("after_s", [1.0, 3.0])
def test_ctrl_c_ends_a_command_with_one_line_and_130(after_s: float) -> None:
    """SIGINT while the run imports what it needs, and in the middle of it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "conformance", "cpu://?capacity=64MiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after_s)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED_EXIT_CODE, stderr
    assert stderr.strip().splitlines() == ["kvstore: interrupted"], stderr


def test_conformance_without_pytest_names_the_extra() -> None:
    """pytest is not a runtime dependency: without it ``kvstore conformance``
    says which extra to install, and exits 2."""
    without_pytest = "import sys; sys.modules['pytest'] = None\n" + IMPORTS_TORCH
    result = subprocess.run(
        [sys.executable, "-c", without_pytest, "conformance", "cpu://"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "kvstore-llm[conformance]" in " ".join(result.stderr.split())
