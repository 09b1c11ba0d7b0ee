"""What a user who does not own the files pays to open them, now that the kernel checks ACLs.

    .venv/bin/python bench/nonowner_access.py                 # 2,000 files, read 5 times
    .venv/bin/python bench/nonowner_access.py --files 10000 --rounds 3 --uid 1000

As root: a fresh razorfs (mkfs + mount under --workdir) gets a directory of --files one-byte
files; then a child process with --uid (and its gid) opens and reads each of them, --rounds
times, and the same on a plain directory of the same disk. Printed: the time of each, and the
daemon's GETXATTR and GETATTR counts over the reads (`razorfs stats`). A non-owner's access is
checked against the file's ACL, which the kernel asks the daemon for again after every
attribute refresh (1 s timeout); see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def razorfs(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "razorfs", *args], capture_output=True,
                          text=True, check=True)
    return done.stdout


def counts(mountpoint: str) -> dict[str, int]:
    ops = json.loads(razorfs("stats", mountpoint, "--json"))["requests"]["ops"]
    return {op: ops.get(op, {}).get("count", 0) for op in ("getxattr", "getattr", "lookup")}


def populate(directory: str, files: int) -> None:
    os.makedirs(directory)
    for i in range(files):
        with open(os.path.join(directory, f"f{i}"), "wb") as stream:
            stream.write(b"x")
    os.chmod(directory, 0o755)


def read_as(uid: int, directory: str, files: int, rounds: int) -> float:
    """Seconds for ``rounds`` passes of open + read + close of every file, as ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            start = time.perf_counter()
            for _ in range(rounds):
                for i in range(files):
                    with open(os.path.join(directory, f"f{i}"), "rb") as stream:
                        stream.read()
            os.write(write_end, repr(time.perf_counter() - start).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        elapsed = answer.read()
    os.waitpid(pid, 0)
    if not elapsed:
        raise SystemExit(f"the reader as uid {uid} failed")
    return float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uid", type=int, default=1000)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount, and reads as another user)")
    root = tempfile.mkdtemp(prefix="razorfs-nonowner-", dir=args.workdir)
    os.chmod(root, 0o755)
    data, mountpoint = os.path.join(root, "data"), os.path.join(root, "mnt")
    os.mkdir(mountpoint)
    try:
        razorfs("mkfs", data)
        razorfs("mount", data, mountpoint, "--allow-other")
        try:
            os.chmod(mountpoint, 0o755)
            populate(os.path.join(mountpoint, "d"), args.files)
            before = counts(mountpoint)
            seconds = read_as(args.uid, os.path.join(mountpoint, "d"), args.files, args.rounds)
            after = counts(mountpoint)
        finally:
            razorfs("umount", mountpoint)
        populate(os.path.join(root, "plain"), args.files)
        plain = read_as(args.uid, os.path.join(root, "plain"), args.files, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    opens = args.files * args.rounds
    print(f"{opens} opens + reads as uid {args.uid}: razorfs {seconds:.2f} s, "
          f"plain directory {plain:.2f} s")
    print("daemon requests during the reads: " + ", ".join(
        f"{op} {after[op] - before[op]}" for op in after))


if __name__ == "__main__":
    main()
