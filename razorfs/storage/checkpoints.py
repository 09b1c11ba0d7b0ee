"""Checkpoint files, the superblock and the epochs file: reading and writing them atomically.

Byte layouts and validity rules are in ``formats``; what a checkpoint body means is
``razorfs.state.snapshot``'s. Two checkpoints are kept, so that if the newest is ever found
damaged the previous one plus the log still rebuild everything.
"""

from __future__ import annotations

from razorfs.storage import formats
from razorfs.storage.formats import FormatError, Superblock
from razorfs.storage.interface import Storage

CHECKPOINTS_KEPT = 2


def read_superblock(storage: Storage) -> Superblock:
    if not storage.exists(formats.SUPERBLOCK_PATH):
        raise FormatError("not a razorfs data directory (no superblock; run `razorfs mkfs`)")
    return Superblock.decode(storage.read_file(formats.SUPERBLOCK_PATH))


def list_checkpoints(storage: Storage) -> list[tuple[int, str]]:
    """(LSN, path) of every checkpoint file, oldest first."""
    found = []
    for name in storage.listdir(formats.CHECKPOINT_DIR):
        lsn = formats.parse_lsn_name(name, ".ckpt")
        if lsn is not None:
            found.append((lsn, f"{formats.CHECKPOINT_DIR}/{name}"))
    return sorted(found)


def read_checkpoint(storage: Storage, path: str, uuid: bytes) -> tuple[int, bytes]:
    """(LSN, body) of a valid checkpoint file, or FormatError naming what is wrong."""
    return formats.decode_checkpoint(storage.read_file(path), uuid, path)


def write_checkpoint(storage: Storage, uuid: bytes, lsn: int, body: bytes | list[bytes]) -> None:
    """Write the checkpoint as of ``lsn`` atomically and drop all but the newest
    ``CHECKPOINTS_KEPT``. ``body``: the body, or the list of its parts, written without joining
    them (a copy of a big body would hold the GIL, and so every request, while it is made)."""
    parts = [body] if isinstance(body, bytes) else body
    storage.write_file_atomically(formats.checkpoint_name(lsn),
                                  [formats.checkpoint_header(lsn, uuid, parts), *parts])
    stale = list_checkpoints(storage)[:-CHECKPOINTS_KEPT]
    for _, path in stale:
        storage.unlink(path)
    if stale:
        storage.fsync_dir(formats.CHECKPOINT_DIR)


def read_epochs(storage: Storage, uuid: bytes) -> list[tuple[int, int]]:
    """The epochs file's (first inode number, epoch) entries: none if there is no file (a
    filesystem made before epochs existed), FormatError if it is damaged."""
    if not storage.exists(formats.EPOCHS_PATH):
        return []
    return formats.decode_epochs(storage.read_file(formats.EPOCHS_PATH), uuid)


def write_epochs(storage: Storage, uuid: bytes, entries: list[tuple[int, int]]) -> None:
    storage.write_file_atomically(formats.EPOCHS_PATH, formats.encode_epochs(entries, uuid))
