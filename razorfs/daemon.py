"""The mount daemon: lock the data directory, recover, mount, serve, and shut down cleanly.

Start-up order: lock → recovery coordinator (which recovers, then starts allocator, WAL writer
and tree manager) → mount (``kernel_mount``, served by pyfuse3) → "ready". Shutdown (unmount,
SIGTERM or SIGINT): the FUSE loop ends, the FUSE layer's mailboxes close, the coordinator takes
a final checkpoint and closes the tree manager, which closes the WAL writer (final commit),
which closes the allocator.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import signal
import socket
import stat
import sys
import urllib.parse
from dataclasses import dataclass

import pyfuse3
import structlog
import trio

from razorfs import control, kernel_mount, prometheus
from razorfs import log as razorfs_log
from razorfs.actors import messages as m
from razorfs.actors.mailbox import Mailbox, open_mailbox
from razorfs.actors.recovery_coordinator import RecoveryCoordinator
from razorfs.actors.replicator import Replicator, ReplicaTuning
from razorfs.actors.system import Handles, Tuning
from razorfs.datadir import DataDirLock, check_data_dir
from razorfs.errors import UsageError
from razorfs.fuse.operations import Operations
from razorfs.state.replica import ReplicaHold
from razorfs.storage.files import FileStorage
from razorfs.storage.formats import BLOCK_SIZE, FormatError

log = structlog.get_logger("razorfs.daemon")


@dataclass(frozen=True)
class MountOptions:
    data_dir: str
    mountpoint: str
    allow_other: bool = False
    sync_writes: bool = False
    commit_interval: float = 1.0
    ready_fd: int | None = None
    log_level: str = "info"
    log_file: str | None = None
    read_only: bool = False
    noatime: bool = False
    mount_flags: tuple[str, ...] = ()  # kernel mount flags passed to libfuse: noexec, suid...
    metrics: str | None = None  # ADDRESS:PORT of an opt-in Prometheus endpoint
    checkpoint_bytes: int | None = None  # benchmarks only: None = Tuning's default
    checkpoint_records: int | None = None  # benchmarks only: None = Tuning's default
    replica: str | None = None  # s3://BUCKET/PREFIX
    replica_retention: float | None = None  # seconds; None keeps everything
    replica_backlog_bytes: int | None = None  # tests only: None = ReplicaTuning's default
    replica_base_bytes: int | None = None  # tests only: None = ReplicaTuning's default


# Kernel mount flags that pass through libfuse to mount(2) unchanged, as mount(8) means them.
KERNEL_MOUNT_FLAGS = frozenset({"nosuid", "suid", "nodev", "dev", "noexec", "exec"})


def mount_source(data_dir: str) -> str:
    """The data directory as the mount's source (shown by df, read back by umount and stats):
    percent-encoded, because libfuse takes options as ASCII and splits them at commas."""
    return urllib.parse.quote(data_dir, safe="/-_.~+:@")


def check_mountpoint(path: str, data_dir: str | None = None) -> None:
    """Refuse a mountpoint that is missing or taken. The mount a killed daemon of ``data_dir``
    left behind (its connection dead) is not in the way: the next daemon of that data
    directory detaches it once it holds the lock (``detach_dead_mount``)."""
    if data_dir is not None and _dead_mount_of(data_dir, path):
        return
    try:
        is_directory = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        is_directory = False
    except OSError as exc:
        raise UsageError(f"{path}: mountpoint is not usable ({exc.strerror}); if a razorfs "
                         f"daemon died there, run `fusermount3 -u {path}` first") from None
    if not is_directory:
        raise UsageError(f"{path}: mountpoint does not exist or is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path}: something is already mounted there")


def razorfs_mount_source(mountpoint: str) -> str | None:
    """The source (fsname) of the razorfs mounted at ``mountpoint``, or None. Read from
    mountinfo, since a stat() of a dead FUSE mount fails and one of a live mount served by
    this process would be a request to ourselves."""
    target = os.path.abspath(mountpoint)
    source = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if (unescape_mount_field(fields[4]) == target
                    and fields[separator + 1] == "fuse.razorfs"):
                source = unescape_mount_field(fields[separator + 2])  # the topmost one wins
            elif unescape_mount_field(fields[4]) == target:
                source = None
    return source


def _dead_mount_of(data_dir: str, mountpoint: str) -> bool:
    """A razorfs mount of ``data_dir`` at ``mountpoint`` while no daemon holds the data
    directory: nobody serves it (the daemon was killed)."""
    from razorfs.datadir import holder_pid

    return (razorfs_mount_source(mountpoint) == mount_source(os.path.abspath(data_dir))
            and holder_pid(data_dir) is None)


def detach_dead_mount(data_dir: str, mountpoint: str) -> None:
    """With the data directory's lock held, any razorfs mount of it is dead: detach it
    (MNT_DETACH, as `fusermount3 -u -z`: processes still inside see ENOTCONN, as before)."""
    if razorfs_mount_source(mountpoint) != mount_source(data_dir):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise UsageError(f"{mountpoint}: cannot detach the dead mount a killed daemon left "
                         f"there ({os.strerror(error)})")
    log.warning("detached the mount a killed daemon left behind", mountpoint=mountpoint)


_MNT_DETACH = 2


def notify_systemd(message: str) -> None:
    """sd_notify: a datagram to $NOTIFY_SOCKET, if systemd gave us one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def run(options: MountOptions) -> int:
    """Mount and serve until unmounted; raises UsageError for bad input before mounting."""
    log_stream = _configure_logging(options)
    data_dir = os.path.abspath(options.data_dir)
    mountpoint = os.path.abspath(options.mountpoint)
    check_data_dir(data_dir)
    check_mountpoint(mountpoint, data_dir)
    with DataDirLock(data_dir):
        detach_dead_mount(data_dir, mountpoint)
        check_mountpoint(mountpoint)
        storage = FileStorage(data_dir)
        try:
            trio.run(_serve, storage, data_dir, mountpoint, options, log_stream)
        except BaseExceptionGroup as group:
            _raise_bad_input(group)
            raise
    log.info("stopped cleanly", data_dir=data_dir)
    return 0


def _raise_bad_input(group: BaseExceptionGroup) -> None:
    """Trio wraps errors from tasks in exception groups; when every error is bad input (a
    damaged or foreign data directory found by recovery), raise it plainly for the CLI."""
    leaves = []
    pending = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    if leaves and all(isinstance(leaf, (UsageError, FormatError)) for leaf in leaves):
        raise leaves[0] from None


def _configure_logging(options: MountOptions, previous=None):
    """Point the log at --log-file (opened anew: after logrotate moved it) or stderr; close
    the stream it replaces. Returns the new stream."""
    stream = open(options.log_file, "a", buffering=1) if options.log_file else sys.stderr
    razorfs_log.configure(options.log_level, stream)
    if previous is not None and previous is not stream and previous is not sys.stderr:
        previous.close()
    return stream


def _return_freed_heap() -> None:
    """Hand the heap recovery freed (the checkpoint's bytes, the log read, temporary objects)
    back to the kernel: glibc would keep it for reuse the daemon never makes. Nothing to do
    with a C library that has no ``malloc_trim``."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


async def _serve(storage: FileStorage, data_dir: str, mountpoint: str,
                 options: MountOptions, log_stream) -> None:
    coordinator, coordinator_inbox = open_mailbox()
    tuning = Tuning(commit_interval=options.commit_interval,
                    checkpoint_bytes=options.checkpoint_bytes or Tuning.checkpoint_bytes,
                    checkpoint_records=options.checkpoint_records or Tuning.checkpoint_records)
    hold = ReplicaHold(options.replica) if options.replica else None
    replica = None
    async with trio.open_nursery() as actors:
        notify_systemd("STATUS=recovering")
        handles = await actors.start(
            RecoveryCoordinator(coordinator_inbox, storage, tuning, replica_hold=hold).run)
        if hold is not None:
            replica, replica_inbox = open_mailbox()
            await actors.start(Replicator(
                replica_inbox, storage, handles.recovered.superblock.uuid, handles.blocks,
                handles.wal_status, hold, coordinator.clone(), _replica_tuning(options)).run)
        # The recovered tree (a million inodes are several million objects) forms no garbage
        # cycles: frozen out of the collector's sight, it is no longer walked by every full
        # collection, which held up all requests for up to a second on a big tree.
        gc.freeze()
        _return_freed_heap()
        try:
            await _mount_and_serve(handles, coordinator, replica, data_dir, mountpoint, options,
                                   log_stream)
        finally:
            if replica is not None:
                await replica.aclose()  # ships what it can, then lets go of the coordinator
            # Closing the coordinator's inbox: final checkpoint, then every actor stops.
            await coordinator.aclose()


def _replica_tuning(options: MountOptions) -> ReplicaTuning:
    defaults = ReplicaTuning()
    return ReplicaTuning(
        retention_seconds=options.replica_retention,
        backlog_bytes=options.replica_backlog_bytes or defaults.backlog_bytes,
        base_min_bytes=options.replica_base_bytes or defaults.base_min_bytes)


async def _mount_and_serve(handles: Handles, coordinator: Mailbox, replica: Mailbox | None,
                           data_dir: str, mountpoint: str, options: MountOptions,
                           log_stream) -> None:
    operations = Operations(handles, sync_writes=options.sync_writes, noatime=options.noatime,
                            read_only=options.read_only)
    fuse_options = set(pyfuse3.default_options) | {f"fsname={mount_source(data_dir)}",
                                                    "subtype=razorfs", *options.mount_flags}
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.read_only:
        fuse_options.add("ro")
    if options.noatime:
        fuse_options.add("noatime")  # shown in /proc/mounts; the daemon keeps atimes itself

    async def collect_stats() -> dict:
        return await collect(handles, coordinator, replica, operations, options)

    async def remount(*, read_only: bool, noatime: bool) -> dict:
        """`mount -o remount,...` (mount.fuse.razorfs): the daemon's side of the switch."""
        if not (isinstance(read_only, bool) and isinstance(noatime, bool)):
            raise TypeError("read_only and noatime must be true or false")
        await operations.remount(read_only=read_only, noatime=noatime)
        log.info("remounted", read_only=read_only, noatime=noatime)
        return {"read_only": operations.read_only, "noatime": operations.noatime}

    try:
        kernel = kernel_mount.mount(mountpoint, fuse_options)
        try:
            pyfuse3.init(operations, mountpoint if kernel is None else kernel.session_path,
                         fuse_options)
        except BaseException:
            if kernel is not None:
                kernel.abandon()
            raise
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, options, log_stream)
                nursery.start_soon(_watchdog)
                await nursery.start(control.serve, data_dir,
                                    {"stats": collect_stats, "remount": remount})
                metrics_server = (prometheus.serve(options.metrics, collect_stats)
                                  if options.metrics else None)
                nursery.start_soon(_tune_readahead, operations, mountpoint)
                try:
                    _announce_ready(options, data_dir, mountpoint, handles)
                    await pyfuse3.main()
                finally:
                    if metrics_server is not None:
                        await trio.to_thread.run_sync(metrics_server.shutdown)
                nursery.cancel_scope.cancel()
        finally:
            notify_systemd("STOPPING=1")
            ours = kernel is not None and kernel.connected()
            pyfuse3.close(unmount=True)  # closes the descriptor; unmounts what libfuse mounted
            if ours:
                kernel.detach()
            log.info("unmounted; committing and checkpointing", mountpoint=mountpoint)
    finally:
        await operations.close_mailboxes()


async def collect(handles: Handles, coordinator: Mailbox, replica: Mailbox | None,
                  operations: Operations, options: MountOptions) -> dict:
    """Live counters for `razorfs stats`."""
    tree = await handles.tree.ask(m.TreeStats())
    wal = await handles.wal.ask(m.WalStats())
    space = await handles.allocator.ask(m.SpaceStats())
    checkpoints = await coordinator.ask(m.CheckpointStats())
    disk = await trio.to_thread.run_sync(handles.blocks.disk_space)
    stats = {
        "requests": operations.metrics.snapshot(),
        "wal": {"last_lsn": tree.last_lsn, "durable_lsn": wal.durable_lsn,
                "durable_lag": tree.last_lsn - wal.durable_lsn,
                "records": wal.records, "commits": wal.batches, "fsyncs": wal.fsyncs,
                "average_group_size": round(wal.records / wal.batches, 2) if wal.batches else 0.0,
                "bytes_since_checkpoint": wal.bytes_since_trim},
        "checkpoints": {"count": checkpoints.written,
                        "last_seconds": round(checkpoints.last_seconds, 4)},
        "space": {"block_size": BLOCK_SIZE, "blocks_used": space.used,
                  "blocks_free_in_store": space.free, "blocks_pending_free": space.pending,
                  "disk_available_bytes": disk.available},
        "inodes": tree.inodes,
        "durability": "sync" if options.sync_writes else "fsync",
        "read_only": operations.read_only,
        "noatime": operations.noatime,
        "failsafe": tree.failsafe,
    }
    if replica is not None:
        stats["replica"] = (await replica.ask(m.ReplicaStats())).values
    return stats


READAHEAD_KB = 1024


async def _tune_readahead(operations: Operations, mountpoint: str) -> None:
    """Raise the mount's readahead from the kernel's 128 KiB default to 1 MiB: sequential reads
    then arrive as 1 MiB requests, and each request costs the daemon about the same whatever
    its size. Only after FUSE INIT was answered (the kernel sets readahead from that reply);
    the device comes from mountinfo, as a stat() of the mountpoint would be a request to
    ourselves."""
    await operations.initialized.wait()
    device = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if unescape_mount_field(fields[4]) == mountpoint:
                device = fields[2]
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as control:
            control.write(f"{READAHEAD_KB}\n")
    except OSError as exc:
        log.info("readahead left at the kernel default", device=device, reason=str(exc))


def unescape_mount_field(field: str) -> str:
    """Undo the octal escapes (\\040 for a space...) of /proc/self/mounts and mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _announce_ready(options: MountOptions, data_dir: str, mountpoint: str, handles) -> None:
    recovered = handles.recovered
    log.info("mounted", data_dir=data_dir, mountpoint=mountpoint,
             replayed=recovered.replayed, orphans_reclaimed=recovered.orphans,
             durability="sync" if options.sync_writes else "fsync")
    notify_systemd(f"READY=1\nSTATUS=mounted, replayed {recovered.replayed} WAL records")
    if options.ready_fd is not None:
        os.write(options.ready_fd, b"ready\n")
        os.close(options.ready_fd)


async def _handle_signals(options: MountOptions, log_stream) -> None:
    """SIGTERM/SIGINT: unmount (then commit, checkpoint, exit 0). SIGHUP: reopen the log file
    (after logrotate moved it)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log_stream = _configure_logging(options, log_stream)
                log.info("log reopened")
                continue
            log.info("signal received; unmounting", signal=signal.Signals(signum).name)
            pyfuse3.terminate()


async def _watchdog() -> None:
    """WATCHDOG=1 from the trio loop itself at half the interval systemd asked for: a wedged
    loop stops the pings and systemd restarts the service."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return
    interval = int(usec) / 2_000_000
    while True:
        notify_systemd("WATCHDOG=1")
        await trio.sleep(interval)
