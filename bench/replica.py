"""Replica measurements (issue 16): python bench/replica.py [--mib N] [--files N]

Starts the tests' Swift S3 server, then for each workload (a sequential write of N MiB in
1 MiB writes, fs_mark-like creation of N small files of 4 KiB with an fsync each 100) mounts
razorfs without and with --replica, and prints: the workload's time both ways (the mount's own
speed), the replica's lag when the workload ends and how long until it is 0 again, bytes
uploaded per byte written; then the time of `razorfs restore` of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.replica.s3server import SwiftS3  # noqa: E402

RAZORFS = [sys.executable, "-m", "razorfs"]


def run(*args) -> str:
    result = subprocess.run([*RAZORFS, *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"razorfs {args[0]} failed: {result.stderr}")
    return result.stdout


def stats(mountpoint: Path) -> dict:
    return json.loads(run("stats", mountpoint, "--json"))


def sequential(mountpoint: Path, mib: int) -> int:
    block = os.urandom(1 << 20)
    with open(mountpoint / "seq", "wb") as stream:
        for _ in range(mib):
            stream.write(block)
        stream.flush()
        os.fsync(stream.fileno())
    return mib << 20


def small_files(mountpoint: Path, count: int) -> int:
    data = os.urandom(4096)
    for directory in range(0, count, 1000):
        (mountpoint / f"d{directory}").mkdir()
    for number in range(count):
        path = mountpoint / f"d{number // 1000 * 1000}" / f"f{number}"
        with open(path, "wb") as stream:
            stream.write(data)
            if number % 100 == 99:
                os.fsync(stream.fileno())
    return count * 4096


def measure(root: Path, url: str | None, workload, size) -> dict:
    data, mountpoint = root / "data", root / "mnt"
    mountpoint.mkdir(parents=True)
    run("mkfs", data)
    run("mount", data, mountpoint, *(("--replica", url) if url else ()))
    try:
        if url:  # the first base, before the clock starts
            while stats(mountpoint)["replica"]["needs_base"]:
                time.sleep(0.05)
        started = time.monotonic()
        written = workload(mountpoint, size)
        seconds = time.monotonic() - started
        result = {"seconds": round(seconds, 2), "MB/s": round(written / seconds / 1e6, 1)}
        if url:
            replica = stats(mountpoint)["replica"]
            result["lag_at_end"] = {k: replica[k] for k in ("lag_lsns", "lag_bytes",
                                                              "lag_seconds")}
            ended = time.monotonic()
            while True:
                current = stats(mountpoint)
                if current["replica"]["lag_lsns"] == 0 and (
                        current["replica"]["shipped_lsn"] >= current["wal"]["durable_lsn"]):
                    break
                time.sleep(0.05)
            result["lag_to_zero_s"] = round(time.monotonic() - ended, 2)
            result["uploaded_per_written"] = round(
                current["replica"]["bytes_uploaded"] / written, 3)
    finally:
        run("umount", mountpoint)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="replica-bench-") as temp:
        root = Path(temp)
        server = SwiftS3(root / "swift")
        server.start()
        try:
            os.environ.update(server.environment())
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
            for name, workload, size in (("sequential write", sequential, args.mib),
                                         ("small files", small_files, args.files)):
                bucket = f"bench-{int(time.time() * 1000)}"
                client.create_bucket(Bucket=bucket)
                url = f"s3://{bucket}/fs"
                plain = measure(root / f"{bucket}-plain", None, workload, size)
                replicated = measure(root / bucket, url, workload, size)
                started = time.monotonic()
                run("restore", url, root / f"{bucket}-restored")
                restore_seconds = round(time.monotonic() - started, 2)
                print(json.dumps({"workload": name, "size": size, "without_replica": plain,
                                  "with_replica": replicated,
                                  "speed_ratio": round(plain["seconds"]
                                                       / replicated["seconds"], 2),
                                  "restore_seconds": restore_seconds}), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
