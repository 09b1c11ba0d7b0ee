"""How long the mount after a crash takes, for a given tree and a given log to replay.

    .venv/bin/python bench/crash_mount.py                        # 1M files, 275,000 records
    .venv/bin/python bench/crash_mount.py --records 1000000      # the log scale.py leaves
    .venv/bin/python bench/crash_mount.py --files 20000 --records 5000 --runs 1   # quick

A data directory is built once under --workdir, as a crash would leave it: a checkpoint of
--files empty files (directories of 1,000) and, after it, --records committed WAL records, each
a ``PutInode`` of one of those files (what a chmod, utime or write's size change logs: the
smallest common record, so the most records per byte of log). Then, --runs times: a fresh copy
of it, the page cache dropped, ``razorfs mount`` timed until the mount answers (what scale.py
calls "mount after kill -9"), the daemon's ``recovered`` event for where the time went, and
``razorfs umount``.

The default --records is what the default checkpoint triggers let a crash leave at most:
250,000 records since the last checkpoint (``Tuning.checkpoint_records``) plus those logged
while a checkpoint runs (at most ~10 s at 1M inodes, at the ~2,400 changes/s this machine
manages: ~25,000). Building the 1M-file fixture takes about a minute. Run as root (drops the
page cache, mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import time

from razorfs.state import redo, snapshot
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.datadir import mkfs
from razorfs.storage import formats
from razorfs.storage.files import FileStorage
from razorfs.state.tree import ROOT_INO, TreeState

T0 = 1_700_000_000_000_000_000
FILES_PER_DIRECTORY = 1000
SEGMENT_BYTES = 16 << 20
RECORDS_PER_BATCH = 8
RAZORFS = [sys.executable, "-m", "razorfs"]


def build(path: str, files: int, records: int) -> None:
    superblock = mkfs(path)
    storage = FileStorage(path)
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    ino = ROOT_INO + 1
    file_inos = []
    for d in range((files + FILES_PER_DIRECTORY - 1) // FILES_PER_DIRECTORY):
        directory = ino
        ino += 1
        state.apply(redo.PutInode(directory, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 0, T0, T0, T0))
        state.apply(redo.PutEntry(ROOT_INO, b"d%05d" % d, directory))
        for f in range(min(FILES_PER_DIRECTORY, files - d * FILES_PER_DIRECTORY)):
            state.apply(redo.PutInode(ino, stat.S_IFREG | 0o644, 1, 0, 0, 0, 0, T0, T0, T0))
            state.apply(redo.PutEntry(directory, b"f%07d" % f, ino))
            file_inos.append(ino)
            ino += 1
    write_checkpoint(storage, superblock.uuid, 0, snapshot.encode(state))
    lsn, batch, first, size = 1, 1, 1, 0
    segment: list[bytes] = []
    while lsn <= records:
        if not segment or size > SEGMENT_BYTES - 4096:
            write_segment(path, first, segment)
            first = lsn
            segment = [formats.encode_segment_header(lsn, superblock.uuid)]
            size = len(segment[0])
        count = min(RECORDS_PER_BATCH, records - lsn + 1)
        for k in range(count):
            when = T0 + lsn
            payload = redo.encode_ops([redo.PutInode(file_inos[lsn % len(file_inos)],
                                               stat.S_IFREG | 0o600, 1, 0, 0, 0, 0, when, when,
                                               when)])
            record = formats.encode_record(lsn, batch, payload, count - k - 1)
            segment.append(record)
            size += len(record)
            lsn += 1
        batch += 1
    write_segment(path, first, segment)


def write_segment(path: str, first_lsn: int, parts: list[bytes]) -> None:
    if parts:
        with open(os.path.join(path, formats.segment_name(first_lsn)), "wb") as out:
            out.write(b"".join(parts))
            os.fsync(out.fileno())


def recovered_event(log_path: str) -> dict:
    with open(log_path) as stream:
        events = [json.loads(line) for line in stream if '"recovered"' in line]
    return events[-1]


def mount_once(fixture: str, workdir: str) -> dict:
    data, mountpoint = os.path.join(workdir, "run"), os.path.join(workdir, "mnt")
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(fixture, data)
    os.makedirs(mountpoint, exist_ok=True)
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")
    started = time.perf_counter()
    subprocess.run(RAZORFS + ["mount", data, mountpoint], check=True, stdout=subprocess.DEVNULL)
    os.listdir(mountpoint)
    seconds = time.perf_counter() - started
    try:
        event = recovered_event(os.path.join(data, "razorfs.log"))
    finally:
        subprocess.run(RAZORFS + ["umount", mountpoint], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(data)
    return {"seconds": seconds, "replayed": event["replayed"], "inodes": event["inodes"],
            "split": event["seconds"], "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--records", type=int, default=275_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp/razorfs-crash-mount")
    args = parser.parse_args()
    fixture = os.path.join(args.workdir, f"fixture-{args.files}-{args.records}")
    if not os.path.exists(os.path.join(fixture, "superblock")):
        shutil.rmtree(fixture, ignore_errors=True)
        print(f"building {fixture} ...", file=sys.stderr)
        build(fixture, args.files, args.records)
    runs = []
    for run in range(args.runs):
        result = mount_once(fixture, args.workdir)
        runs.append(result)
        split = ", ".join(f"{name} {value:.2f} s" for name, value in result["split"].items())
        print(f"run {run + 1}: mount {result['seconds']:.2f} s ({split}; "
              f"{result['replayed']:,} records replayed, {result['inodes']:,} inodes, "
              f"load {result['load']:.2f})")
    times = [r["seconds"] for r in runs]
    print(f"mount after a crash, {args.files:,} files + {args.records:,} records: median "
          f"{statistics.median(times):.2f} s, range {min(times):.2f}-{max(times):.2f} s "
          f"over {len(times)} runs (target <= 10 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
