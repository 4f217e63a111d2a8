"""A full disk is a full tier: ENOSPC under an nvme tier far larger than its disk.

The scenario (``full_disk_scenario.py``) runs in a child process in a private
mount namespace with a 12 MiB tmpfs mounted for it: unprivileged through a
user namespace where the kernel allows one, else as root. The tier keeps
caching (the newest chunks hit) and every chunk file on disk is one the store
counts, so it can evict it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("full_disk_scenario.py")
NAMESPACES = (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"])


def private_mount_command(directory: Path) -> list[str] | None:
    """An ``unshare`` prefix under which ``mount -t tmpfs`` works here, or ``None``."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in NAMESPACES:
        probe = [*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{directory}'"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return prefix
    return None


def test_a_full_disk_evicts_and_keeps_caching(tmp_path: Path) -> None:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    prefix = private_mount_command(mount_point)
    if prefix is None:
        pytest.skip(
            "cannot mount a small tmpfs here: unshare needs user namespaces (or root) "
            "and a mount command"
        )
    script = (
        f"mount -t tmpfs -o size=12m tmpfs '{mount_point}' && "
        f"exec '{sys.executable}' '{SCENARIO}' '{mount_point}'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["newest_hits"] == 4 and report["intact"], report
    assert report["failed"] == 0, report
    assert report["evictions"] > 0, report
    assert report["files"] == report["counted"], report  # no chunk file the store does not count
    assert report["file_bytes"] == report["counted_bytes"], report
