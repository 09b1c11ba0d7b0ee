"""``razorfs`` command line: mkfs, mount, umount, fsck, stats.

Exit status: 0 success, 1 failure (fsck found problems, unmount failed), 2 bad input (missing or
foreign data directory, locked, unknown format version, bad mountpoint).
"""

from __future__ import annotations

import argparse
import json
import os
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
    return parser


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

    check_data_dir(args.data_dir)
    daemon.check_mountpoint(args.mountpoint, args.data_dir)
    if not args.foreground:
        return _mount_in_background(args)
    options = daemon.MountOptions(
        data_dir=args.data_dir, mountpoint=args.mountpoint, allow_other=args.allow_other,
        sync_writes=args.durability == "sync", commit_interval=args.commit_interval,
        ready_fd=args.ready_fd, log_level=args.log_level, log_file=args.log_file,
        read_only=args.read_only, noatime=args.noatime, mount_flags=args.mount_flags,
        metrics=args.metrics,
        checkpoint_bytes=args.checkpoint_bytes, checkpoint_records=args.checkpoint_records)
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
    from razorfs.daemon import unescape_mount_field as _unescape

    target = os.path.abspath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            source, point, fstype = line.split()[:3]
            if _unescape(point) == target and fstype == "fuse.razorfs":
                return urllib.parse.unquote(_unescape(source))
    raise UsageError(f"{mountpoint}: no razorfs is mounted there")


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
    requests = stats["requests"]
    print(f"bytes read {requests['bytes_read']}, written {requests['bytes_written']}")
    print(f"{'op':<12}{'count':>10}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for op, row in requests["ops"].items():
        print(f"{op:<12}{row['count']:>10}{row['errors']:>8}{row['p50_ms']:>10}{row['p99_ms']:>10}")
    return EXIT_OK


_COMMANDS = {"mkfs": _mkfs, "mount": _mount, "umount": _umount, "fsck": _fsck, "stats": _stats}
