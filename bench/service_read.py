"""The service's own read and write figures (issue 13): a 512 MiB file written in 1 MiB writes
and fsync'd, then read sequentially in 1 MiB reads, cold (the unit restarted, the page cache
dropped), through razorfs run by the templated unit under a real systemd (tests/service/harness.py's
container) with the readahead the daemon sets and with the kernel's 128 KiB default the old unit
was held to, then the same through a mount made by hand here. Medians of ``--repeat`` runs, in
MiB/s. Run as root; it drops the page cache."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import drop_caches  # noqa: E402
from tests.service.harness import PROJECT, SystemdBox, service_venv  # noqa: E402

SIZE = 512 << 20
CHUNK = 1 << 20


def write_rate(path: Path) -> float:
    block = os.urandom(CHUNK)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(SIZE // CHUNK):
            os.write(fd, block)
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return SIZE / elapsed / CHUNK


def read_rate(path: Path) -> float:
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        start, total = time.perf_counter(), 0
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    assert total == SIZE
    return SIZE / elapsed / CHUNK


def under_the_unit(workdir: Path, repeat: int) -> dict[str, list[float]]:
    box = SystemdBox(workdir / "box")
    box.prepare()
    try:
        box.install_razorfs(service_venv())
        box.write("/etc/systemd/system/razorfs@.service",
                  (PROJECT / "deploy/systemd/razorfs@.service").read_text())
        box.boot()
        box.run("razorfs", "mkfs", "/var/lib/razorfs/bench", check=True)
        box.run("mkdir", "-p", "/srv/razorfs/bench", check=True)
        box.run("systemctl", "start", "razorfs@bench", check=True)
        big = box.inside("/srv/razorfs/bench/big")
        rates: dict[str, list[float]] = {"unit, write + fsync": [],
                                         "unit, read, readahead set by the daemon": [],
                                         "unit, read, readahead left at 128 KiB": []}
        for _ in range(repeat):
            rates["unit, write + fsync"].append(write_rate(big))
            for label, forced in zip(list(rates)[1:], (None, "128")):
                box.run("systemctl", "restart", "razorfs@bench", check=True)
                device = box.mount_entry("/srv/razorfs/bench")[2]
                control = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
                deadline = time.monotonic() + 10
                while control.read_text().strip() != "1024":  # the daemon sets it after INIT
                    assert time.monotonic() < deadline, "the daemon did not set the readahead"
                    time.sleep(0.05)
                if forced:
                    control.write_text(forced)
                rates[label].append(read_rate(big))
        box.run("systemctl", "stop", "razorfs@bench", check=True)
        return rates
    finally:
        box.stop()


def by_hand(workdir: Path, repeat: int) -> dict[str, list[float]]:
    razorfs = [sys.executable, "-m", "razorfs"]
    data, mountpoint = workdir / "data", workdir / "mnt"
    subprocess.run(razorfs + ["mkfs", str(data)], check=True, capture_output=True)
    mountpoint.mkdir()
    rates: dict[str, list[float]] = {"by hand, write + fsync": [], "by hand, read": []}
    subprocess.run(razorfs + ["mount", str(data), str(mountpoint)], check=True,
                   capture_output=True)
    try:
        for _ in range(repeat):
            rates["by hand, write + fsync"].append(write_rate(mountpoint / "big"))
            subprocess.run(razorfs + ["umount", str(mountpoint)], check=True, capture_output=True)
            subprocess.run(razorfs + ["mount", str(data), str(mountpoint)], check=True,
                           capture_output=True)
            rates["by hand, read"].append(read_rate(mountpoint / "big"))
    finally:
        subprocess.run(razorfs + ["umount", str(mountpoint)], capture_output=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # the hand-run data directory on the disk the suite's probes use (/var/tmp, not tmpfs)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        rates = under_the_unit(Path(workdir), args.repeat)
        rates.update(by_hand(Path(workdir), args.repeat))
    for label, runs in rates.items():
        print(f"{label:40} {statistics.median(runs):6.0f} MiB/s   runs {[round(r) for r in runs]}")
    print(f"load average {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
