"""File handles (name_to_handle_at / open_by_handle_at, what an NFS export is built on).

A handle is the inode number and its generation. It must open the same file after the kernel
forgot the inode (dropped caches, an unmount and mount) as on ext4, answer ESTALE once the file
is gone, and never reach another file: not even one that got the same inode number after a
crash lost the transaction that first gave it (razorfs.state.generations). Root has
CAP_DAC_READ_SEARCH, which open_by_handle_at needs.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
MAX_HANDLE_SZ = 128


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path) -> FileHandle:
    handle = FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(handle),
                               ctypes.byref(mount_id), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return handle


def open_by_handle(mountpoint, handle: FileHandle, flags: int = os.O_RDONLY) -> int:
    mount_fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags)
    finally:
        os.close(mount_fd)
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def drop_inode_caches() -> None:
    """Make the kernel forget every unused dentry and inode, FUSE ones included: it sends
    FORGET, and the next use of a handle must ask the daemon (LOOKUP of ".")."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("2\n")


def what_handle_opens(mountpoint, handle: FileHandle, flags: int = os.O_RDONLY):
    """What a program sees opening ``handle``: the file's inode number and content (a
    directory's sorted names), or the errno."""
    try:
        fd = open_by_handle(mountpoint, handle, flags)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    try:
        if flags & os.O_DIRECTORY:
            return os.fstat(fd).st_ino, sorted(os.listdir(fd))
        return os.fstat(fd).st_ino, os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def make_tree(root: Path) -> dict[str, tuple[FileHandle, int]]:
    """Files and directories at several depths; (handle, open flags) of each."""
    (root / "top").write_bytes(b"top file")
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "deep").write_bytes(b"deep file")
    (root / "d" / "gone").write_bytes(b"removed later")
    (root / "d" / "gone dir").mkdir()
    return {
        "top": (name_to_handle(root / "top"), os.O_RDONLY),
        "deep": (name_to_handle(root / "d" / "e" / "deep"), os.O_RDONLY),
        "dir": (name_to_handle(root / "d" / "e"), os.O_RDONLY | os.O_DIRECTORY),
        "gone": (name_to_handle(root / "d" / "gone"), os.O_RDONLY),
        "gone dir": (name_to_handle(root / "d" / "gone dir"), os.O_RDONLY | os.O_DIRECTORY),
    }


def opened(mountpoint, handles) -> dict:
    return {name: what_handle_opens(mountpoint, handle, flags)
            for name, (handle, flags) in handles.items()}


def test_handles_open_the_same_file_after_caches_drop_and_remount_as_on_ext4(mount, tmp_path):
    ext4 = tmp_path / "ext4"
    ext4.mkdir()
    sides = {"ext4": (ext4, make_tree(ext4)), "razorfs": (mount.path, make_tree(mount.path))}
    expected = {"top": b"top file", "deep": b"deep file", "dir": ["deep"],
                "gone": b"removed later", "gone dir": []}
    inode_numbers = {}
    for side, (root, handles) in sides.items():
        inode_numbers[side] = {name: os.stat(root / path).st_ino for name, path in (
            ("top", "top"), ("deep", "d/e/deep"), ("dir", "d/e"), ("gone", "d/gone"),
            ("gone dir", "d/gone dir"))}
        assert opened(root, handles) == {name: (inode_numbers[side][name], content)
                                         for name, content in expected.items()}, side
    for root, _ in sides.values():
        (root / "d" / "gone").unlink()
        (root / "d" / "gone dir").rmdir()
    drop_inode_caches()
    results = {side: opened(root, handles) for side, (root, handles) in sides.items()}
    for side in sides:
        assert results[side] == {
            **{name: (inode_numbers[side][name], expected[name])
               for name in ("top", "deep", "dir")},
            "gone": "ESTALE", "gone dir": "ESTALE"}, side

    mount.remount()
    assert opened(mount.path, sides["razorfs"][1]) == results["razorfs"]


def test_a_handle_never_reaches_the_file_that_got_its_number_after_a_crash(make_mount):
    """A file created and not yet durable when the daemon is killed is lost, and the next
    mount gives its inode number to the next file created: the old handle must answer ESTALE,
    not open that file. A file made durable before keeps working handles."""
    mount = make_mount("--commit-interval", "600")
    (mount.path / "kept").write_bytes(b"durable")
    fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    kept = name_to_handle(mount.path / "kept")
    (mount.path / "lost").write_bytes(b"never durable")
    lost_number = os.stat(mount.path / "lost").st_ino
    lost = name_to_handle(mount.path / "lost")
    mount.kill9()
    mount.mount()
    assert not (mount.path / "lost").exists()
    (mount.path / "new").write_bytes(b"a different file")
    assert os.stat(mount.path / "new").st_ino == lost_number, "the number was not given again"
    drop_inode_caches()
    assert what_handle_opens(mount.path, lost) == "ESTALE"
    assert what_handle_opens(mount.path, kept) == (os.stat(mount.path / "kept").st_ino,
                                                   b"durable")
    assert what_handle_opens(mount.path, name_to_handle(mount.path / "new"))[1] == \
        b"a different file"
