"""Offline consistency check of a data directory: ``razorfs fsck DATA_DIR [--repair]``.

Loads the state exactly as recovery would (checkpoint + WAL replay, read-only), then checks the
tree against itself and against the block store. Each problem names its inode and path.

``--repair`` first runs recovery in salvage mode (a log damaged mid-way ends at the damage; the
committed records after it are counted and given up, explicitly), then fixes what can be fixed
without guessing: entries pointing nowhere are removed, link counts recomputed, inodes no name
reaches are linked into /lost+found, blocks mapped past the end of a file unmapped. The result
is written as a new checkpoint. What cannot be fixed (data blocks whose checksum fails, blocks
owned twice) is reported and left alone: only a backup can bring those bytes back.
"""

from __future__ import annotations

import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from razorfs.state import redo, snapshot
from razorfs.state.recovery import load, recover
from razorfs.state.tree import ROOT_INO, TreeState
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.checkpoints import write_checkpoint
from razorfs.storage.files import FileStorage
from razorfs.storage.formats import BLOCK_SIZE, FormatError, crc
from razorfs.storage.interface import Storage

LOST_AND_FOUND = b"lost+found"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    inodes: int = 0
    blocks_checked: int = 0
    fixes: list = field(default_factory=list)  # redo operations that repair the tree

    @property
    def clean(self) -> bool:
        return not self.problems

    def problem(self, text: str, *fix) -> None:
        self.problems.append(text)
        self.fixes.extend(fix)


class Progress:
    """A progress line on a terminal (stderr), at most every second; silent otherwise."""

    def __init__(self, stream=None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._shown_at = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._enabled and (now - self._shown_at >= 1.0 or done == total):
            self._shown_at = now
            self._stream.write(f"\r{what}: {done}/{total}")
            if done == total:
                self._stream.write("\n")
            self._stream.flush()


def check(storage: Storage, *, verify_data: bool = True, progress=None) -> Report:
    report = Report()
    try:
        recovered = load(storage)
    except FormatError as exc:
        report.problems.append(str(exc))
        return report
    for reason in recovered.skipped_checkpoints:
        report.problems.append(f"damaged checkpoint (an older one was usable): {reason}")
    if recovered.epochs_damage:
        report.problems.append(f"{recovered.epochs_damage} (rewritten at the next mount or "
                               "repair: file handles made before then answer ESTALE)")
    _check_state(storage, recovered, report, verify_data, progress)
    return report


def _check_state(storage: Storage, recovered, report: Report, verify_data: bool,
                 progress) -> None:
    end = recovered.log_end
    if end is not None and end.reason:
        report.notes.append(f"torn WAL tail, cut at next mount: {end.reason}")
    if recovered.orphans:
        report.notes.append(f"{recovered.orphans} orphan inode(s), reclaimed at next mount")
    report.notes.append(f"checkpoint LSN {recovered.checkpoint_lsn}, "
                        f"{recovered.replayed} WAL record(s) to replay")
    state = recovered.state
    report.inodes = len(state.inodes)
    paths = _check_tree(state, report)
    blocks = BlockStore(storage)
    try:
        _check_blocks(state, blocks, paths, report, verify_data, progress or Progress(),
                      recovered.logged_blocks)
    finally:
        blocks.close()


def repair(storage: Storage, *, verify_data: bool = True, progress=None) -> Report:
    """Salvage the log, fix the tree, checkpoint the result; return the report of the check
    made before the fixes (with ``repairs`` saying what was done)."""
    report = Report()
    recovered = recover(storage, salvage=True)
    if recovered.discarded:
        report.repairs.append(f"WAL damaged at {recovered.log_end.reason}: salvaged the log up "
                              f"to there, {recovered.discarded} later committed record(s) "
                              "discarded")
    for path in recovered.damaged_checkpoints:
        report.repairs.append(f"damaged checkpoint {path} set aside as {path}.damaged")
    if recovered.epochs_damage:
        report.repairs.append(f"{recovered.epochs_damage}: rewritten, file handles made "
                              "before answer ESTALE")
    _check_state(storage, recovered, report, verify_data, progress)
    if report.fixes:
        state = recovered.state
        for op in report.fixes:
            state.apply(op)
        write_checkpoint(storage, recovered.superblock.uuid, recovered.last_lsn,
                         snapshot.encode(state))
        report.repairs.append(f"applied {len(report.fixes)} fix(es) and wrote a checkpoint")
    return report


def _check_tree(state: TreeState, report: Report) -> dict[int, str]:
    if ROOT_INO not in state.inodes or not state.inodes[ROOT_INO].is_dir:
        report.problems.append("root directory (inode 1) is missing: not repairable")
        return {}
    paths = {ROOT_INO: "/"}
    references: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    pending = [ROOT_INO]
    while pending:
        directory = state.inodes[pending.pop()]
        for name, child_ino in list(directory.directory.names.items()):
            path = paths[directory.ino].rstrip("/") + "/" + name.decode(errors="replace")
            child = state.inodes.get(child_ino)
            if child is None:
                report.problem(f"{path}: entry points to missing inode {child_ino}",
                               redo.DropEntry(directory.ino, name))
                continue
            if child.is_dir and child_ino in paths:
                report.problem(f"inode {child_ino} ({path}): directory has two names (or a "
                               "cycle)", redo.DropEntry(directory.ino, name))
                continue
            references[child_ino] += 1
            if child.is_dir:
                subdirs[directory.ino] += 1
                pending.append(child_ino)
            paths.setdefault(child_ino, path)
    # Directories the repair will add (lost+found and the ones linked into it): their links
    # are fixed along, but are not problems of the tree as it is.
    planned: Counter[int] = Counter()
    _attach_unreachable(state, report, paths, references, planned)
    for ino, inode in state.inodes.items():
        if ino not in paths:
            continue
        expected = 2 + subdirs[ino] if inode.is_dir else references[ino]
        repaired = expected + planned[ino] if inode.is_dir else expected
        if inode.nlink != expected:
            report.problem(f"inode {ino} ({paths[ino]}): link count {inode.nlink}, expected "
                           f"{expected}", inode.put_op(nlink=repaired))
        elif repaired != expected:
            report.fixes.append(inode.put_op(nlink=repaired))
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target):
            report.problem(f"inode {ino} ({paths[ino]}): symlink size {inode.size}, target is "
                           f"{len(inode.target)} bytes", inode.put_op(size=len(inode.target)))
    return paths


def _attach_unreachable(state: TreeState, report: Report, paths: dict[int, str],
                        references: Counter, planned: Counter) -> None:
    """Link every inode no name reaches into /lost+found as ``#INO`` (counted as references
    so the link count check sees the repaired tree)."""
    named_elsewhere = {child for inode in state.inodes.values() if inode.is_dir
                       for child in inode.directory.names.values()}
    lost = [ino for ino in state.inodes if ino not in paths and ino not in named_elsewhere]
    if not lost:
        for ino in state.inodes:
            if ino not in paths:
                report.problems.append(f"inode {ino}: unreachable, inside a cycle of "
                                       "unreachable directories: not repaired")
        return
    root = state.inodes[ROOT_INO]
    found_ino = root.directory.names.get(LOST_AND_FOUND)
    if found_ino is None:
        found_ino = state.next_ino
        now = time.time_ns()
        lost_dirs = sum(state.inodes[ino].is_dir for ino in lost)
        report.fixes += [redo.PutInode(found_ino, stat.S_IFDIR | 0o700, 2 + lost_dirs, 0, 0, 0, 0,
                                    now, now, now),
                         redo.PutEntry(ROOT_INO, LOST_AND_FOUND, found_ino)]
        planned[ROOT_INO] += 1
    for ino in lost:
        name = f"#{ino}".encode()
        report.problem(f"inode {ino}: not reachable from the root (linked as "
                       f"/lost+found/{name.decode()})", redo.PutEntry(found_ino, name, ino))
        references[ino] += 1
        paths[ino] = f"/lost+found/{name.decode()}"
        if state.inodes[ino].is_dir:
            planned[found_ino] += 1


def _check_blocks(state: TreeState, blocks: BlockStore, paths: dict[int, str], report: Report,
                  verify_data: bool, progress, logged: dict[int, bytes]) -> None:
    """``logged``: blocks the log carries (PutData), checked there: recovery writes them back."""
    store_blocks = blocks.block_count()
    owners: dict[int, tuple[int, int]] = {}
    past_end: dict[int, int] = {}
    used = list(state.used_blocks())
    for done, (pblk, ino, lblk, checksum) in enumerate(used, 1):
        where = f"inode {ino} ({paths.get(ino, '?')}) offset {lblk * BLOCK_SIZE}"
        if pblk in owners:
            other = owners[pblk]
            report.problems.append(f"{where}: block {pblk} also used by inode {other[0]} "
                                   f"offset {other[1] * BLOCK_SIZE}: not repairable")
            continue
        owners[pblk] = (ino, lblk)
        if lblk * BLOCK_SIZE >= state.inodes[ino].size:
            past_end[ino] = -(-state.inodes[ino].size // BLOCK_SIZE)
            report.problems.append(f"{where}: block mapped past the end of the file")
        if pblk in logged:
            if crc(logged[pblk]) != checksum:
                report.problems.append(f"{where}: logged data block {pblk} checksum mismatch")
            continue
        if pblk >= store_blocks:
            report.problems.append(f"{where}: block {pblk} is beyond the block store's end: "
                                   "not repairable")
            continue
        if verify_data:
            report.blocks_checked += 1
            if crc(blocks.read_run(pblk, 1)) != checksum:
                report.problems.append(f"{where}: data block {pblk} checksum mismatch: not "
                                       "repairable (reads of it answer EIO)")
            progress("data blocks verified", done, len(used))
    report.fixes += [redo.TruncateBlocks(ino, keep) for ino, keep in past_end.items()]


def run(data_dir: str, *, verify_data: bool = True, repair_problems: bool = False) -> Report:
    storage = FileStorage(data_dir)
    if repair_problems:
        return repair(storage, verify_data=verify_data)
    return check(storage, verify_data=verify_data)
