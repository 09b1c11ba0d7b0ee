"""A seeded workload on a mounted razorfs with a model of what the tree holds after each step,
and two views of a tree to compare with it: a mounted directory and an unmounted data directory
(read offline, as fsck does)."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

from razorfs.state.recovery import load
from razorfs.storage.blockstore import BlockStore
from razorfs.storage.files import FileStorage
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.state.tree import ROOT_INO


def mounted_tree(root: Path) -> dict:
    """path -> ("d", perm) | ("f", perm, bytes) | ("l", target) of everything under root."""
    found = {}
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("l", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = ("d", stat.S_IMODE(info.st_mode))
            else:
                found[relative] = ("f", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def data_dir_tree(data_dir: Path) -> dict:
    """The same view of an unmounted data directory, from its checkpoint and log."""
    storage = FileStorage(str(data_dir))
    state = load(storage).state
    blocks = BlockStore(storage)
    found = {}
    try:
        pending = [(ROOT_INO, "")]
        while pending:
            ino, prefix = pending.pop()
            for name, child in state.inodes[ino].directory.names.items():
                path = prefix + name.decode()
                inode = state.inodes[child]
                if inode.is_dir:
                    found[path] = ("d", stat.S_IMODE(inode.mode))
                    pending.append((child, path + "/"))
                elif stat.S_ISLNK(inode.mode):
                    found[path] = ("l", inode.target.decode())
                else:
                    content = bytearray(inode.size)
                    for lblk, packed in inode.blocks.items():
                        data = blocks.read_run(packed >> 32, 1)
                        start = lblk * BLOCK_SIZE
                        content[start : start + BLOCK_SIZE] = data[: max(0, inode.size - start)]
                    found[path] = ("f", stat.S_IMODE(inode.mode), bytes(content[: inode.size]))
    finally:
        blocks.close()
    return found


class Workload:
    """Random creates, overwrites (copy-on-write: the old blocks are freed), truncates,
    renames, unlinks, mkdirs and symlinks under ``root``, mirrored in ``model``."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = Path(root)
        self.random = random.Random(seed)
        self.model: dict = {}
        self.counter = 0

    def _files(self):
        return [path for path, value in self.model.items() if value[0] == "f"]

    def _dirs(self):
        return [""] + [path for path, value in self.model.items() if value[0] == "d"]

    def _new_name(self) -> str:
        self.counter += 1
        parent = self.random.choice(self._dirs())
        return (parent + "/" if parent else "") + f"n{self.counter}"

    def _bytes(self, size: int) -> bytes:
        return self.random.randbytes(size)

    def step(self) -> None:
        files = self._files()
        choice = self.random.random()
        if choice < 0.3 or not files:
            path = self._new_name()
            data = self._bytes(self.random.choice([0, 10, 4096, 5000, 20_000, 70_000]))
            (self.root / path).write_bytes(data)
            self.model[path] = ("f", 0o644, data)
        elif choice < 0.55:
            path = self.random.choice(files)
            old = self.model[path][2]
            offset = self.random.randrange(0, len(old) + 1)
            patch = self._bytes(self.random.choice([1, 100, 4096, 9000]))
            with open(self.root / path, "r+b") as stream:
                stream.seek(offset)
                stream.write(patch)
            data = old[:offset] + patch + old[offset + len(patch):]
            self.model[path] = ("f", 0o644, data)
        elif choice < 0.65:
            path = self.random.choice(files)
            size = self.random.randrange(0, len(self.model[path][2]) + 1)
            os.truncate(self.root / path, size)
            self.model[path] = ("f", 0o644, self.model[path][2][:size])
        elif choice < 0.75:
            path = self.random.choice(files)
            target = self._new_name()
            os.rename(self.root / path, self.root / target)
            self.model[target] = self.model.pop(path)
        elif choice < 0.85:
            path = self.random.choice(files)
            os.unlink(self.root / path)
            del self.model[path]
        elif choice < 0.93:
            path = self._new_name()
            os.mkdir(self.root / path)
            os.chmod(self.root / path, 0o755)
            self.model[path] = ("d", 0o755)
        else:
            path = self._new_name()
            target = f"t{self.counter}"
            os.symlink(target, self.root / path)
            self.model[path] = ("l", target)

    def snapshot(self) -> dict:
        return dict(self.model)
