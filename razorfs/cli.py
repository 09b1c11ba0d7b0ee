"""``razorfs`` command line: mkfs, mount, umount, fsck, stats, restore, replica ls.

Exit status: 0 success, 1 failure (fsck found problems, unmount failed), 2 bad input (missing or
foreign data directory, locked, unknown format version, bad mountpoint).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse

from razorfs import log as razorfs_log
from razorfs.errors import UsageError
from razorfs.storage.formats import FormatError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="razorfs", description="crash-safe FUSE filesystem")
    commands = parser.add_subparsers(dest="command", required=True)

    mkfs = commands.add_parser("mkfs", help="create a filesystem in an empty data directory")
    mkfs.add_argument("data_dir")

    mount = commands.add_parser("mount", help="mount a data directory")
    mount.add_argument("data_dir")
    mount.add_argument("mountpoint")
    mount.add_argument("--foreground", action="store_true",
                       help="stay in the foreground (default: return once mounted)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let users other than the mounting one access the mount")
    mount.add_argument("--durability", choices=("fsync", "sync"), default="fsync",
                       help="fsync: changes durable at fsync or within --commit-interval; "
                            "sync: every change durable before its syscall returns")
    mount.add_argument("--commit-interval", type=float, default=1.0, metavar="SECONDS",
                       help="longest time a change waits to be committed (default 1)")
    mount.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    mount.add_argument("--log-file", help="daemon log (default without --foreground: "
                                          "DATA_DIR/razorfs.log)")
    mount.add_argument("--read-only", action="store_true", help="mount read-only")
    mount.add_argument("--noatime", action="store_true",
                       help="never update access times (default: relatime, like Linux)")
    mount.add_argument("--mount-flags", type=_mount_flags, default=(), metavar="FLAG,...",
                       help="kernel mount flags: nosuid (default) or suid, nodev (default) or "
                            "dev, noexec or exec")
    mount.add_argument("--metrics", metavar="[ADDRESS:]PORT",
                       help="serve Prometheus metrics over HTTP (address defaults to 127.0.0.1)")
    mount.add_argument("--replica", metavar="s3://BUCKET/PREFIX",
                       help="ship every committed change to this S3 bucket prefix (endpoint and "
                            "credentials: the standard AWS variables and files)")
    mount.add_argument("--replica-retention", type=duration, metavar="DURATION",
                       help="keep every moment of the last DURATION restorable (e.g. 7d, 12h, "
                            "30m, 90s) and prune what is older; default: keep everything")
    # tests only: unshipped WAL bytes kept locally before the replica needs a fresh base
    mount.add_argument("--replica-backlog-bytes", type=int, help=argparse.SUPPRESS)
    # tests only: chunk bytes since the newest base before another (with a retention)
    mount.add_argument("--replica-base-bytes", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    # benchmarks only (bench/scale.py): WAL bytes that trigger a checkpoint (default 64 MiB)
    mount.add_argument("--checkpoint-bytes", type=int, help=argparse.SUPPRESS)
    # benchmarks only: WAL records that trigger a checkpoint (default 250,000)
    mount.add_argument("--checkpoint-records", type=int, help=argparse.SUPPRESS)

    umount = commands.add_parser("umount", help="unmount and wait for the daemon to finish")
    umount.add_argument("mountpoint")
    umount.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")

    fsck = commands.add_parser("fsck", help="check a data directory that is not mounted")
    fsck.add_argument("data_dir")
    fsck.add_argument("--quick", action="store_true", help="skip data block checksums")
    fsck.add_argument("--repair", action="store_true",
                      help="salvage a damaged log and fix what can be fixed safely, saying what")

    stats = commands.add_parser("stats", help="live counters of a mounted filesystem")
    stats.add_argument("mountpoint")
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    restore = commands.add_parser("restore", help="build a data directory from a replica")
    restore.add_argument("url", metavar="s3://BUCKET/PREFIX")
    restore.add_argument("data_dir", help="new data directory (missing or empty)")
    target = restore.add_mutually_exclusive_group()
    target.add_argument("--to-lsn", type=int, metavar="N",
                        help="the state after LSN N (default: the newest the replica holds)")
    target.add_argument("--to-time", type=timestamp, metavar="ISO8601",
                        help="the newest state durable at that time (e.g. 2026-05-01T12:00:00"
                             "+00:00; local time without an offset)")

    replica = commands.add_parser("replica", help="inspect a replica")
    replica_commands = replica.add_subparsers(dest="replica_command", required=True)
    listing = replica_commands.add_parser("ls", help="the restorable ranges (LSNs, times)")
    listing.add_argument("url", metavar="s3://BUCKET/PREFIX")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` → seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 7d, 12h, 30m, 90s)")
    return float(match[1]) * _UNITS[match[2]]


def timestamp(text: str) -> int:
    """An ISO 8601 time → ns since the epoch (local time when it has no offset)."""
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return int(moment.timestamp() * 1_000_000) * 1000
def _mount_flags(text: str) -> tuple[str, ...]:
    from razorfs.daemon import KERNEL_MOUNT_FLAGS

    flags: list[str] = []
    for flag in filter(None, text.split(",")):
        if flag not in KERNEL_MOUNT_FLAGS:
            raise argparse.ArgumentTypeError(
                f"unknown mount flag {flag!r}; known: {', '.join(sorted(KERNEL_MOUNT_FLAGS))}")
        opposite = flag[2:] if flag.startswith("no") else f"no{flag}"
        flags = [kept for kept in flags if kept not in (flag, opposite)] + [flag]  # last wins
    return tuple(flags)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "mount":
        razorfs_log.configure("warning")  # recovery warnings of fsck etc. go to stderr
    try:
        return _COMMANDS[args.command](args)
    except (UsageError, FormatError) as exc:
        print(f"razorfs {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _mkfs(args) -> int:
    from razorfs.datadir import mkfs

    superblock = mkfs(args.data_dir)
    print(f"created razorfs in {args.data_dir} (uuid {superblock.uuid.hex()})")
    return EXIT_OK


def _mount(args) -> int:
    from razorfs import daemon
    from razorfs.datadir import check_data_dir
    from razorfs.storage.objectstore import ReplicaURL

    check_data_dir(args.data_dir)
    daemon.check_mountpoint(args.mountpoint, args.data_dir)
    if args.replica:
        ReplicaURL.parse(args.replica)  # bad input before the daemon starts
    elif args.replica_retention is not None:
        raise UsageError("--replica-retention needs --replica")
    if not args.foreground:
        return _mount_in_background(args)
    options = daemon.MountOptions(
        data_dir=args.data_dir, mountpoint=args.mountpoint, allow_other=args.allow_other,
        sync_writes=args.durability == "sync", commit_interval=args.commit_interval,
        ready_fd=args.ready_fd, log_level=args.log_level, log_file=args.log_file,
        read_only=args.read_only, noatime=args.noatime, mount_flags=args.mount_flags,
        metrics=args.metrics,
        checkpoint_bytes=args.checkpoint_bytes, checkpoint_records=args.checkpoint_records,
        replica=args.replica, replica_retention=args.replica_retention,
        replica_backlog_bytes=args.replica_backlog_bytes,
        replica_base_bytes=args.replica_base_bytes)
    return daemon.run(options)


def _mount_in_background(args) -> int:
    """Start the daemon detached and return once it says the mount is live (or failed)."""
    log_file = args.log_file or os.path.join(args.data_dir, "razorfs.log")
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "razorfs", "mount", args.data_dir, args.mountpoint,
               "--foreground", "--durability", args.durability,
               "--commit-interval", str(args.commit_interval), "--log-level", args.log_level,
               "--log-file", log_file, "--ready-fd", str(write_end)]
    if args.allow_other:
        command.append("--allow-other")
    if args.read_only:
        command.append("--read-only")
    if args.noatime:
        command.append("--noatime")
    if args.mount_flags:
        command += ["--mount-flags", ",".join(args.mount_flags)]
    if args.metrics:
        command += ["--metrics", args.metrics]
    if args.checkpoint_bytes is not None:
        command += ["--checkpoint-bytes", str(args.checkpoint_bytes)]
    if args.checkpoint_records is not None:
        command += ["--checkpoint-records", str(args.checkpoint_records)]
    if args.replica:
        command += ["--replica", args.replica]
    for flag, value in (("--replica-retention", args.replica_retention),
                        ("--replica-backlog-bytes", args.replica_backlog_bytes),
                        ("--replica-base-bytes", args.replica_base_bytes)):
        if value is not None:
            command += [flag, f"{value}s" if flag == "--replica-retention" else str(value)]
    with open(log_file, "ab") as log_stream:
        log_start = log_stream.tell()
    with open(os.devnull, "rb") as devnull, open(log_file, "ab") as log_stream:
        daemon_process = subprocess.Popen(command, stdin=devnull, stdout=log_stream,
                                          stderr=log_stream, pass_fds=(write_end,),
                                          start_new_session=True)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = ready.read(6)
    if answer == b"ready\n":
        print(f"mounted {args.data_dir} on {args.mountpoint} (daemon pid {daemon_process.pid}, "
              f"log {log_file})")
        return EXIT_OK
    code = daemon_process.wait()
    with open(log_file, "rb") as log_stream:
        log_stream.seek(log_start)
        lines = log_stream.read().decode(errors="replace").strip().splitlines()
    print("\n".join(lines[-5:]) or f"razorfs mount: daemon exited with status {code}",
          file=sys.stderr)
    return code or EXIT_FAILED


def _find_mount(mountpoint: str) -> str:
    """The data directory of the razorfs mounted at ``mountpoint``."""
    from razorfs.mounts import mount_at

    entry = mount_at(mountpoint)
    if entry is None or entry.fstype != "fuse.razorfs":
        raise UsageError(f"{mountpoint}: no razorfs is mounted there")
    return urllib.parse.unquote(entry.source)


def _umount(args) -> int:
    from razorfs.datadir import holder_pid

    data_dir = _find_mount(args.mountpoint)
    pid = holder_pid(data_dir)
    result = subprocess.run(["fusermount3", "-u", args.mountpoint], capture_output=True,
                            text=True)
    if result.returncode != 0:
        reason = result.stderr.strip()
        if "busy" in reason:
            reason = f"{args.mountpoint} is busy (files open or a process inside it): {reason}"
        print(f"razorfs umount: {reason}", file=sys.stderr)
        return EXIT_FAILED
    deadline = time.monotonic() + args.timeout
    while holder_pid(data_dir) is not None:
        if time.monotonic() > deadline:
            print(f"razorfs umount: daemon (pid {pid}) still running after {args.timeout}s",
                  file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.05)
    print(f"unmounted {args.mountpoint}; daemon (pid {pid}) committed and exited")
    return EXIT_OK


def _fsck(args) -> int:
    from razorfs import fsck
    from razorfs.storage.checkpoints import read_superblock
    from razorfs.datadir import DataDirLock, check_data_dir
    from razorfs.storage.files import FileStorage

    check_data_dir(args.data_dir)
    read_superblock(FileStorage(args.data_dir))  # bad input (exit 2), not a problem found
    with DataDirLock(args.data_dir):
        if args.repair:
            before = fsck.run(args.data_dir, verify_data=not args.quick, repair_problems=True)
            _print_report(args.data_dir, before)
            for repair in before.repairs:
                print(f"REPAIRED: {repair}")
            print("checking again after repair:")
        report = fsck.run(args.data_dir, verify_data=not args.quick)
    _print_report(args.data_dir, report)
    return EXIT_OK if report.clean else EXIT_FAILED


def _print_report(data_dir: str, report) -> None:
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    verdict = "clean" if report.clean else f"{len(report.problems)} problem(s)"
    print(f"{data_dir}: {report.inodes} inodes, {report.blocks_checked} data blocks "
          f"verified: {verdict}")


def _stats(args) -> int:
    from razorfs.control import ControlError, query

    data_dir = _find_mount(args.mountpoint)
    try:
        stats = query(data_dir)
    except ControlError as exc:
        print(f"razorfs stats: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(stats, indent=1, sort_keys=True))
        return EXIT_OK
    wal = stats["wal"]
    print(f"{args.mountpoint}: {stats['inodes']} inodes, durability {stats['durability']}, "
          f"failsafe: {stats['failsafe'] or 'no'}")
    print(f"wal: lsn {wal['last_lsn']} (durable {wal['durable_lsn']}), {wal['commits']} commits, "
          f"{wal['fsyncs']} fsyncs, {wal['average_group_size']} records per commit")
    print(f"checkpoints: {stats['checkpoints']['count']}, last took "
          f"{stats['checkpoints']['last_seconds']} s")
    if "replica" in stats:
        replica = stats["replica"]
        print(f"replica {replica['url']}: {replica['state']}, shipped LSN "
              f"{replica['shipped_lsn']}, lag {replica['lag_lsns']} LSNs / "
              f"{replica['lag_bytes']} bytes / {replica['lag_seconds']} s"
              + (f", error: {replica['store_error'] or replica['refused']}"
                 if replica['store_error'] or replica['refused'] else ""))
    requests = stats["requests"]
    print(f"bytes read {requests['bytes_read']}, written {requests['bytes_written']}")
    print(f"{'op':<12}{'count':>10}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for op, row in requests["ops"].items():
        print(f"{op:<12}{row['count']:>10}{row['errors']:>8}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    return EXIT_OK


def _restore(args) -> int:
    from razorfs.restore import RestoreError, restore

    try:
        result = restore(args.url, args.data_dir, to_lsn=args.to_lsn, to_time_ns=args.to_time)
    except RestoreError as exc:
        print(f"razorfs restore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"restored {args.url} as of LSN {result.lsn} into {args.data_dir}: {result.inodes} "
          f"inodes, {result.blocks} data blocks (base LSN {result.base}, {result.chunks} "
          f"chunks, {result.bytes_downloaded} bytes downloaded, {result.seconds} s)")
    return EXIT_OK


def _replica(args) -> int:
    from razorfs.restore import RestoreError, listing

    try:
        ranges = listing(args.url)
    except RestoreError as exc:
        print(f"razorfs replica ls: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(ranges, indent=1))
        return EXIT_OK
    if not ranges:
        print(f"{args.url}: nothing restorable yet (no complete base)")
    for span in ranges:
        start, end = (datetime.datetime.fromtimestamp(span[key] / 1e9).astimezone()
                      .isoformat(timespec="milliseconds") for key in ("from_ns", "to_ns"))
        print(f"LSN {span['from_lsn']}..{span['to_lsn']}  {start} .. {end}  "
              f"({span['chunks']} chunks after the base)")
    return EXIT_OK


_COMMANDS = {"mkfs": _mkfs, "mount": _mount, "umount": _umount, "fsck": _fsck, "stats": _stats,
             "restore": _restore, "replica": _replica}
