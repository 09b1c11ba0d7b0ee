"""What keeping the page cache coherent with direct I/O costs (issue 18).

    .venv/bin/python bench/direct_io.py [--ops 3000] [--repeat 3]

On a fresh razorfs mount and on a plain directory of the same disk, µs per operation of:

  direct          4 KiB O_DIRECT pwrites at random block offsets of a 4 MiB file: nothing is
                  cached, so razorfs never invalidates (the price must be nil)
  direct+read     each such pwrite preceded by a buffered 4 KiB read of the file through another
                  descriptor (a page cache miss: the block was just written directly), so every
                  direct write finds a page that may be stale and invalidates the file's cache
  cached re-read  a buffered 4 KiB read of a file nobody writes with O_DIRECT, a page-cache hit
                  (keep_cache: no request reaches the daemon)

Medians of ``--repeat`` runs. Run as root (FUSE).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

BLOCK = 4096
FILE_BLOCKS = 1024


def direct_writes(root: str, ops: int, with_reads: bool) -> float:
    path = os.path.join(root, "direct.bin")
    with open(path, "wb") as stream:
        stream.write(bytes(FILE_BLOCKS * BLOCK))
    writer = os.open(path, os.O_WRONLY | os.O_DIRECT)
    reader = os.open(path, os.O_RDONLY)
    block = mmap.mmap(-1, BLOCK)
    block[:] = random.Random(1).randbytes(BLOCK)
    offsets = [random.Random(2).randrange(FILE_BLOCKS) * BLOCK for _ in range(ops)]
    try:
        started = time.perf_counter()
        for offset in offsets:
            if with_reads:
                os.pread(reader, BLOCK, offset)
            os.pwrite(writer, block, offset)
        return (time.perf_counter() - started) / ops * 1e6
    finally:
        os.close(reader)
        os.close(writer)
        os.unlink(path)


def cached_rereads(root: str, ops: int) -> float:
    path = os.path.join(root, "cached.bin")
    with open(path, "wb") as stream:
        stream.write(random.Random(3).randbytes(FILE_BLOCKS * BLOCK))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, FILE_BLOCKS * BLOCK, 0)
        time.sleep(1.5)  # past the attribute timeout: the cache is settled (auto_inval_data)
        os.pread(fd, FILE_BLOCKS * BLOCK, 0)
        offsets = [random.Random(4).randrange(FILE_BLOCKS) * BLOCK for _ in range(ops)]
        started = time.perf_counter()
        for offset in offsets:
            os.pread(fd, BLOCK, offset)
        return (time.perf_counter() - started) / ops * 1e6
    finally:
        os.close(fd)
        os.unlink(path)


def measure(root: str, ops: int) -> dict[str, float]:
    return {"direct": direct_writes(root, ops, False),
            "direct+read": direct_writes(root, ops, True),
            "cached re-read": cached_rereads(root, ops)}


def razorfs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "razorfs", *args], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {"razorfs": {}, "plain": {}}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix="bench-direct-") as work:
            data, mountpoint, plain = (os.path.join(work, name)
                                       for name in ("data", "mnt", "plain"))
            os.mkdir(mountpoint)
            os.mkdir(plain)
            razorfs("mkfs", data)
            razorfs("mount", data, mountpoint)
            try:
                for target, root in (("razorfs", mountpoint), ("plain", plain)):
                    for name, value in measure(root, args.ops).items():
                        runs[target].setdefault(name, []).append(value)
            finally:
                razorfs("umount", mountpoint)
    print(f"{'µs per op (median)':24}{'razorfs':>10}{'plain':>10}")
    for name in runs["razorfs"]:
        print(f"{name:24}{statistics.median(runs['razorfs'][name]):10.1f}"
              f"{statistics.median(runs['plain'][name]):10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
