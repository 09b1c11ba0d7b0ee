"""Creating a data directory (mkfs) and owning one (the lock that allows a single daemon)."""

from __future__ import annotations

import fcntl
import os
import time
import uuid as uuid_module

from razorfs.errors import UsageError
from razorfs.state import snapshot
from razorfs.state.tree import TreeState
from razorfs.storage import formats
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.storage.files import FileStorage
from razorfs.storage.formats import BLOCK_SIZE, FORMAT_VERSION, Superblock
from razorfs.storage.interface import Storage


def mkfs(path: str, *, uid: int | None = None, gid: int | None = None) -> Superblock:
    """Create an empty razorfs in ``path`` (missing or empty); refuse anything else."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"{path}: exists and is not a directory")
        if os.listdir(path):
            raise UsageError(f"{path}: directory is not empty; refusing to format it")
    else:
        os.makedirs(path, mode=0o700)
    return format_storage(FileStorage(path), uid=os.getuid() if uid is None else uid,
                          gid=os.getgid() if gid is None else gid)


def format_storage(storage: Storage, *, uid: int = 0, gid: int = 0) -> Superblock:
    """Write an empty filesystem (root directory owned by uid:gid) into empty storage."""
    superblock = Superblock(FORMAT_VERSION, BLOCK_SIZE, uuid_module.uuid4().bytes, time.time_ns())
    storage.mkdir(formats.WAL_DIR)
    storage.mkdir(formats.CHECKPOINT_DIR)
    with storage.open(formats.BLOCKS_PATH, create=True) as blocks:
        blocks.fsync()
    storage.fsync_dir("")
    state = TreeState.fresh(uid=uid, gid=gid, now_ns=time.time_ns())
    write_checkpoint(storage, superblock.uuid, 0, snapshot.encode(state))
    # The superblock goes last: a crash during mkfs leaves a directory that is not razorfs yet
    # (`razorfs mount` refuses it), never a half-made one that mounts.
    storage.write_file_atomically(formats.SUPERBLOCK_PATH, superblock.encode())
    return superblock


def check_data_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"{path}: data directory does not exist (create one with `razorfs mkfs`)")
    if not os.path.exists(os.path.join(path, formats.SUPERBLOCK_PATH)):
        raise UsageError(f"{path}: not a razorfs data directory (no superblock)")


class DataDirLock:
    """An exclusive flock on DATA_DIR/lock, held for the life of the process that mounts (or
    checks) the directory. The kernel drops it when the process dies, even by SIGKILL, so a
    crash never leaves a stale lock behind."""

    def __init__(self, path: str) -> None:
        self.path = os.path.join(path, formats.LOCK_PATH)
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{os.path.dirname(self.path)}: data directory is in use by another razorfs "
                f"process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def holder_pid(path: str) -> int | None:
    """The pid written in a data directory's lock file, if a process holds the lock."""
    lock_path = os.path.join(path, formats.LOCK_PATH)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
