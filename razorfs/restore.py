"""``razorfs restore URL NEW_DATA_DIR [--to-lsn N | --to-time T]`` and ``razorfs replica ls``.

Offline (storage and the state machine, no actors): picks the newest complete base at or
before the target whose chunk chain reaches it, loads the base's checkpoint, writes its blocks,
then replays each chunk's records up to the target and writes the blocks they map, in LSN
order, at the same block numbers. Every object is verified as it arrives; at the end every
block the restored tree maps must have come from an object with the CRC the tree gives it.
A missing or damaged object stops the restore naming it (``RestoreError``, exit 2) and the
half-made directory is removed: never a silently wrong file.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

from razorfs.errors import UsageError
from razorfs.state import redo, snapshot
from razorfs.state.generations import Generations
from razorfs.state.replica import mapped_blocks
from razorfs.storage import formats
from razorfs.storage import replica_formats as rf
from razorfs.storage.checkpoints import write_epochs
from razorfs.storage.files import FileStorage
from razorfs.storage.formats import BLOCK_SIZE, FormatError, Superblock
from razorfs.storage.objectstore import MissingObject, ObjectStore, ObjectStoreError, ReplicaURL
from razorfs.storage.replica_catalog import (
    Catalog, Range, base_time, range_times, read_catalog, timeline)


class RestoreError(Exception):
    """The replica cannot give the state asked for: the message names the object or reason."""


class ProgressBar:
    """A bar on a terminal (stderr), redrawn at most 10 times a second; silent otherwise."""

    WIDTH = 30

    def __init__(self, stream=None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._shown_at = 0.0

    def __call__(self, done: int, total: int, transferred: int) -> None:
        now = time.monotonic()
        if not self._enabled or (now - self._shown_at < 0.1 and done < total):
            return
        self._shown_at = now
        filled = self.WIDTH * done // max(total, 1)
        self._stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} "
                           f"objects, {transferred / (1 << 20):.1f} MiB")
        if done >= total:
            self._stream.write("\n")
        self._stream.flush()


@dataclass
class Restored:
    lsn: int
    base: int
    chunks: int
    inodes: int
    blocks: int
    bytes_downloaded: int
    seconds: float


def _open(url: str) -> tuple[ObjectStore, Catalog]:
    store = ObjectStore(ReplicaURL.parse(url))
    try:
        catalog = read_catalog(store)
    except (ObjectStoreError, FormatError) as exc:
        raise RestoreError(str(exc)) from None
    if catalog.uuid is None:
        raise RestoreError(f"{url}: no razorfs replica there (no identity object)")
    return store, catalog


def lsn_at_time(store: ObjectStore, catalog: Catalog, when_ns: int) -> int:
    """The newest LSN seen durable at or before ``when_ns`` that a range can restore."""
    best = None
    for span in catalog.ranges():
        if base_time(store, catalog.uuid, span.base) <= when_ns:
            best = span.base if best is None else max(best, span.base)
        for chunk in span.chunks:
            for lsn, ns in timeline(store, chunk):
                if ns <= when_ns:
                    best = max(best or 0, lsn)
    if best is None:
        raise RestoreError("no restorable moment at or before "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(when_ns / 1e9))}")
    return best


def listing(url: str) -> list[dict]:
    """The restorable ranges, oldest first: base and end LSN, and their times."""
    store, catalog = _open(url)
    result = []
    try:
        for span in catalog.ranges():
            start_ns, end_ns = range_times(store, catalog, span)
            result.append({"from_lsn": span.base, "to_lsn": span.end, "from_ns": start_ns,
                           "to_ns": end_ns, "chunks": len(span.chunks)})
    except (ObjectStoreError, FormatError) as exc:
        raise RestoreError(str(exc)) from None
    return result


def restore(url: str, data_dir: str, *, to_lsn: int | None = None,
            to_time_ns: int | None = None, progress=None) -> Restored:
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or os.listdir(data_dir)):
        raise UsageError(f"{data_dir}: exists and is not an empty directory")
    started = time.monotonic()
    store, catalog = _open(url)
    try:
        if to_time_ns is not None:
            to_lsn = lsn_at_time(store, catalog, to_time_ns)
        if to_lsn is None:
            ranges = catalog.ranges()
            if not ranges:
                raise RestoreError(f"{url}: the replica holds no complete base yet")
            to_lsn = max(span.end for span in ranges)
        span = catalog.range_for(to_lsn)
        if span is None:
            raise RestoreError(_why_not(catalog, to_lsn))
        created = not os.path.exists(data_dir)
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        try:
            result = _build(store, catalog.uuid, span, to_lsn, FileStorage(data_dir),
                            progress or ProgressBar())
        except BaseException:
            _remove_contents(data_dir, created)
            raise
    except (ObjectStoreError, FormatError) as exc:
        raise RestoreError(str(exc)) from None
    result.seconds = round(time.monotonic() - started, 3)
    result.bytes_downloaded = store.bytes_downloaded
    return result


def _why_not(catalog: Catalog, lsn: int) -> str:
    ranges = catalog.ranges()
    if not ranges:
        return "the replica holds no complete base yet"
    spans = ", ".join(f"{span.base}..{span.end}" for span in ranges)
    return f"LSN {lsn} is not restorable from this replica (restorable: {spans})"


def _remove_contents(data_dir: str, created: bool) -> None:
    if created:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        for name in os.listdir(data_dir):
            path = os.path.join(data_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _build(store: ObjectStore, uuid: bytes, span: Range, to_lsn: int, storage: FileStorage,
           progress) -> Restored:
    manifest_key = rf.base_manifest_key(span.base)
    manifest = rf.decode_manifest(_get(store, manifest_key), uuid, f"{store.url}/{manifest_key}")
    chunks = [chunk for chunk in span.chunks if chunk[0] <= to_lsn]
    total = 2 + len(manifest.packs) + len(chunks)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        progress(done, total, store.bytes_downloaded)

    step()
    checkpoint_key = rf.base_checkpoint_key(span.base)
    data = _get(store, checkpoint_key)
    where = f"{store.url}/{checkpoint_key}"
    if formats.crc(data) != manifest.checkpoint_crc:
        raise FormatError(f"{where}: does not match the CRC its base manifest gives")
    lsn, body = formats.decode_checkpoint(data, uuid, where)
    if lsn != span.base:
        raise FormatError(f"{where}: is as of LSN {lsn}, its base is {span.base}")
    try:
        state = snapshot.decode(body)
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None
    del data, body
    step()
    storage.mkdir(formats.WAL_DIR)
    storage.mkdir(formats.CHECKPOINT_DIR)
    written: dict[int, tuple[int, str]] = {}  # pblk -> (crc, object it came from)
    with storage.open(formats.BLOCKS_PATH, create=True) as blocks:
        for number, (pack_crc, count) in enumerate(manifest.packs):
            key = rf.base_pack_key(span.base, number)
            data = _get(store, key)
            if formats.crc(data) != pack_crc:
                raise FormatError(f"{store.url}/{key}: does not match the CRC its base "
                                  "manifest gives")
            for pblk, checksum, block in rf.decode_pack(data, span.base, f"{store.url}/{key}"):
                blocks.pwrite(pblk * BLOCK_SIZE, block)
                written[pblk] = (checksum, key)
            step()
        for chunk in chunks:
            key = rf.chunk_key(*chunk)
            decoded = rf.decode_chunk(_get(store, key), uuid, f"{store.url}/{key}",
                                      mapped_blocks)
            born = iter(decoded.blocks)
            for record in decoded.records:
                if record.lsn > to_lsn:
                    break
                try:
                    for op in redo.decode_ops(record.payload):
                        state.apply(op)
                except Exception as exc:
                    raise FormatError(f"{store.url}/{key}: record LSN {record.lsn} cannot be "
                                      f"replayed: {exc}") from None
                for _ in mapped_blocks(record.payload):
                    pblk, checksum, block = next(born)
                    blocks.pwrite(pblk * BLOCK_SIZE, block)
                    written[pblk] = (checksum, key)
            step()
        for inode in [inode for inode in state.inodes.values() if inode.nlink == 0]:
            state.apply(redo.DropInode(inode.ino))  # open-unlinked files, as recovery does
        count = 0
        for pblk, ino, lblk, checksum in state.used_blocks():
            source = written.get(pblk)
            if source is None or source[0] != checksum:
                raise FormatError(
                    f"inode {ino} offset {lblk * BLOCK_SIZE}: block {pblk} with CRC "
                    f"{checksum:08x} is in no object of the replica (base {span.base}, chunks "
                    f"up to LSN {to_lsn}{'; last written from ' + source[1] if source else ''})")
            count += 1
        blocks.fsync()
    storage.fsync_dir("")
    storage.write_file_atomically(
        formats.checkpoint_name(to_lsn),
        [formats.checkpoint_header(to_lsn, uuid, [body := snapshot.encode(state)]), body])
    # Inode numbers given after the restored moment will be given again: every handle made
    # before the restore must answer ESTALE rather than reach another file (generations.py).
    write_epochs(storage, uuid, Generations.after_damage(time.time_ns() // 10**9).entries)
    storage.write_file_atomically(formats.SUPERBLOCK_PATH, Superblock(
        formats.FORMAT_VERSION, BLOCK_SIZE, uuid, time.time_ns()).encode())
    return Restored(to_lsn, span.base, len(chunks), len(state.inodes), count, 0, 0.0)


def _get(store: ObjectStore, key: str) -> bytes:
    try:
        return store.get(key)
    except MissingObject:
        raise RestoreError(f"{store.url}/{key}: missing from the replica") from None
