"""Offline consistency check of a data directory: ``razorfs fsck DATA_DIR``.

Loads the state exactly as recovery would (checkpoint + WAL replay, read-only), then checks the
tree against itself and against the block store. Each problem names its inode and path.
"""

from __future__ import annotations

import stat
from collections import Counter
from dataclasses import dataclass, field

from razorfs.actors.recovery import load
from razorfs.storage.files import FileStorage
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.formats import BLOCK_SIZE, FormatError, crc
from razorfs.storage.interface import Storage
from razorfs.tree import ROOT_INO, TreeState


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inodes: int = 0
    blocks_checked: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def check(storage: Storage, *, verify_data: bool = True) -> Report:
    report = Report()
    try:
        recovered = load(storage)
    except FormatError as exc:
        report.problems.append(str(exc))
        return report
    for reason in recovered.skipped_checkpoints:
        report.problems.append(f"damaged checkpoint (an older one was usable): {reason}")
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
        _check_blocks(state, blocks, paths, report, verify_data)
    finally:
        blocks.close()
    return report


def _check_tree(state: TreeState, report: Report) -> dict[int, str]:
    if ROOT_INO not in state.inodes or not state.inodes[ROOT_INO].is_dir:
        report.problems.append("root directory (inode 1) is missing")
        return {}
    paths = {ROOT_INO: "/"}
    references: Counter[int] = Counter()
    pending = [ROOT_INO]
    while pending:
        directory = state.inodes[pending.pop()]
        subdirs = 0
        for name, child_ino in directory.directory.names.items():
            path = paths[directory.ino].rstrip("/") + "/" + name.decode(errors="replace")
            child = state.inodes.get(child_ino)
            if child is None:
                report.problems.append(f"{path}: entry points to missing inode {child_ino}")
                continue
            references[child_ino] += 1
            if child.is_dir:
                subdirs += 1
                if child_ino in paths:
                    report.problems.append(f"inode {child_ino} ({path}): directory has two "
                                           "names (or a cycle)")
                    continue
                pending.append(child_ino)
            paths.setdefault(child_ino, path)
        if directory.nlink != 2 + subdirs:
            report.problems.append(f"inode {directory.ino} ({paths[directory.ino]}): directory "
                                   f"link count {directory.nlink}, expected {2 + subdirs}")
    for ino, inode in state.inodes.items():
        if ino not in paths:
            report.problems.append(f"inode {ino}: not reachable from the root")
        elif not inode.is_dir and inode.nlink != references[ino]:
            report.problems.append(f"inode {ino} ({paths[ino]}): link count {inode.nlink}, "
                                   f"{references[ino]} name(s) point to it")
        if stat.S_ISLNK(inode.mode) and inode.size != len(inode.target):
            report.problems.append(f"inode {ino} ({paths.get(ino)}): symlink size mismatch")
    return paths


def _check_blocks(state: TreeState, blocks: BlockStore, paths: dict[int, str], report: Report,
                  verify_data: bool) -> None:
    store_blocks = blocks.block_count()
    owners: dict[int, tuple[int, int]] = {}
    for pblk, ino, lblk, checksum in state.used_blocks():
        where = f"inode {ino} ({paths.get(ino, '?')}) offset {lblk * BLOCK_SIZE}"
        if pblk in owners:
            other = owners[pblk]
            report.problems.append(f"{where}: block {pblk} also used by inode {other[0]} "
                                   f"offset {other[1] * BLOCK_SIZE}")
            continue
        owners[pblk] = (ino, lblk)
        if lblk * BLOCK_SIZE >= state.inodes[ino].size:
            report.problems.append(f"{where}: block mapped past the end of the file")
        if pblk >= store_blocks:
            report.problems.append(f"{where}: block {pblk} is beyond the block store's end")
            continue
        if verify_data:
            report.blocks_checked += 1
            if crc(blocks.read_run(pblk, 1)) != checksum:
                report.problems.append(f"{where}: data block {pblk} checksum mismatch")


def run(data_dir: str, *, verify_data: bool = True) -> Report:
    return check(FileStorage(data_dir), verify_data=verify_data)
