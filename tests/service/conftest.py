"""One container with a real systemd for the whole session (booting costs a few seconds; every
test uses its own unit instance or fstab line, so they share it safely).

Before the boot, the container gets what a user following README would have installed: the
unit in /etc/systemd/system, razorfs linked in /usr/local/bin and its mount helpers in /sbin,
and fstab lines of type fuse.razorfs, so that the boot itself mounts them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .harness import PROJECT, BoxError, SystemdBox, can_boot, service_venv

# fstab lines the boot mounts (name → options); their data directories are made before it
FSTAB = {
    "boot": "nofail",
    "net": "_netdev",
    "auto": "x-systemd.automount,nofail",
}
MISSING = "missing"  # an fstab line whose data directory does not exist, with nofail


def data_dir(name: str) -> str:
    return f"/var/lib/razorfs/{name}"


def mountpoint(name: str) -> str:
    return f"/srv/razorfs/{name}"


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the service tests, a skip would hide failures")
    pytest.skip(message)


@pytest.fixture(scope="session")
def box(tmp_path_factory):
    reason = can_boot()
    if reason:
        _unavailable(f"cannot boot systemd in a container: {reason}")
    box = SystemdBox(tmp_path_factory.mktemp("systemd-box"))
    try:
        box.prepare()
        box.install_razorfs(service_venv())
        box.write("/etc/systemd/system/razorfs@.service",
                  (PROJECT / "deploy/systemd/razorfs@.service").read_text())
        lines = [box.path("/etc/fstab").read_text()]
        for name, options in FSTAB.items():
            _mkfs(box, name)
            lines.append(f"{data_dir(name)} {mountpoint(name)} fuse.razorfs {options} 0 0\n")
        box.path(mountpoint(MISSING)).mkdir(parents=True)
        lines.append(f"{data_dir(MISSING)} {mountpoint(MISSING)} fuse.razorfs nofail 0 0\n")
        box.write("/etc/fstab", "".join(lines))
        box.boot()
    except BoxError as exc:
        box.stop()
        _unavailable(str(exc))
    try:
        yield box
    finally:
        box.stop()


def _mkfs(box: SystemdBox, name: str) -> None:
    """A filesystem for instance or fstab line ``name``, made from here (before the boot)."""
    result = subprocess.run([sys.executable, "-m", "razorfs", "mkfs",
                             str(box.path(data_dir(name)))], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    box.path(mountpoint(name)).mkdir(parents=True, exist_ok=True)
