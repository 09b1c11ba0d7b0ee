"""Benchmarks: razorfs against a plain directory of the same local disk, in the same run.

    .venv/bin/python bench/run.py [--repeat 3] [--quick] [--json bench/results/latest.json]

Each probe runs against a fresh razorfs mount (data directory and mountpoint under --workdir)
and against a plain directory next to it, alternately, --repeat times. The table shows medians
and the ratio razorfs/plain (>1 is better for razorfs for rates). Probes:

  creates       create+close N empty files in one directory           files/s
  stat          os.stat of those N files                              stats/s
  seq_write     1 MiB writes of a 64 MiB file, then fsync             MiB/s
  seq_read      read it back after dropping the page cache            MiB/s
  rand_fsync_K  K processes: 4 KiB pwrite + fsync at random offsets   durable writes/s
                (K = 1, 2, 4, 8, 16: group commit scaling)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20


def probe_creates(root: str, count: int) -> float:
    directory = os.path.join(root, "creates")
    os.mkdir(directory)
    started = time.perf_counter()
    for i in range(count):
        os.close(os.open(os.path.join(directory, f"f{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    return count / (time.perf_counter() - started)


def probe_stat(root: str, count: int) -> float:
    directory = os.path.join(root, "creates")
    started = time.perf_counter()
    for i in range(count):
        os.stat(os.path.join(directory, f"f{i:06d}"))
    return count / (time.perf_counter() - started)


def probe_seq_write(root: str, size: int) -> float:
    chunk = random.Random(1).randbytes(MiB)
    path = os.path.join(root, "seq.bin")
    started = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size // MiB):
        os.write(fd, chunk)
    os.fsync(fd)
    os.close(fd)
    return size / MiB / (time.perf_counter() - started)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def probe_seq_read(root: str, size: int) -> float:
    path = os.path.join(root, "seq.bin")
    drop_caches()
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    while os.read(fd, MiB):
        pass
    os.close(fd)
    return size / MiB / (time.perf_counter() - started)


def _fsync_writer(path: str, seconds: float, seed: int, result) -> None:
    rng = random.Random(seed)
    block = rng.randbytes(4096)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        os.pwrite(fd, block, rng.randrange(256) * 4096)
        os.fsync(fd)
        done += 1
    os.close(fd)
    result.put(done)


def probe_rand_fsync(root: str, writers: int, seconds: float) -> float:
    result = multiprocessing.Queue()
    processes = [multiprocessing.Process(target=_fsync_writer,
                                         args=(os.path.join(root, f"w{i}"), seconds, i, result))
                 for i in range(writers)]
    for process in processes:
        process.start()
    total = sum(result.get() for _ in processes)
    for process in processes:
        process.join()
    return total / seconds


class RazorMount:
    def __init__(self, workdir: str) -> None:
        self.data = os.path.join(workdir, "razorfs-data")
        self.path = os.path.join(workdir, "razorfs-mnt")

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        razorfs = [sys.executable, "-m", "razorfs"]
        subprocess.run(razorfs + ["mkfs", self.data], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(razorfs + ["mount", self.data, self.path], check=True,
                       stdout=subprocess.DEVNULL)
        return self.path

    def __exit__(self, *exc_info) -> None:
        subprocess.run([sys.executable, "-m", "razorfs", "umount", self.path], check=True,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(self.data)


class PlainDir:
    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, "plain")

    def __enter__(self) -> str:
        os.makedirs(self.path)
        return self.path

    def __exit__(self, *exc_info) -> None:
        shutil.rmtree(self.path)


def run_suite(target, args) -> dict[str, float]:
    results = {}
    with target as root:
        results["creates"] = probe_creates(root, args.files)
        results["stat"] = probe_stat(root, args.files)
        results["seq_write"] = probe_seq_write(root, args.size)
        results["seq_read"] = probe_seq_read(root, args.size)
        for writers in args.writers:
            results[f"rand_fsync_{writers}"] = probe_rand_fsync(root, writers, args.seconds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--workdir", default=None, help="directory on the disk to measure")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    args.files = 500 if args.quick else 10_000
    args.size = 8 * MiB if args.quick else 64 * MiB
    args.seconds = 0.5 if args.quick else 3.0
    args.writers = (1, 4) if args.quick else (1, 2, 4, 8, 16)
    workdir = args.workdir or tempfile.mkdtemp(prefix="razorfs-bench-", dir="/var/tmp")
    runs: dict[str, list[dict[str, float]]] = {"razorfs": [], "plain": []}
    for repetition in range(args.repeat):
        runs["razorfs"].append(run_suite(RazorMount(workdir), args))
        runs["plain"].append(run_suite(PlainDir(workdir), args))
        print(f"repetition {repetition + 1}/{args.repeat} done", file=sys.stderr)
    medians = {name: {probe: statistics.median(r[probe] for r in results)
                      for probe in results[0]} for name, results in runs.items()}
    print(f"{'probe':<16}{'razorfs':>12}{'plain':>12}{'ratio':>8}")
    for probe, value in medians["razorfs"].items():
        plain = medians["plain"][probe]
        print(f"{probe:<16}{value:>12.1f}{plain:>12.1f}{value / plain:>8.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"medians": medians, "runs": runs, "repeat": args.repeat}, out, indent=1)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
