"""SnapshotCapture: a checkpoint body produced in chunks while the state keeps changing must be
byte for byte ``to_snapshot()`` of the state when the capture began."""

from __future__ import annotations

import random
import stat
from array import array

import msgpack
import pytest

from razorfs.state import redo, snapshot
from razorfs.state.tree import ROOT_INO, TreeState

T0 = 1_700_000_000_000_000_000
DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777
FIFO = stat.S_IFIFO | 0o600
NAMES = [b"n%d" % i for i in range(12)]
XATTRS = [b"user.a", b"user.b", b"trusted.c"]


def reference_snapshot(state: TreeState) -> bytes:
    """The checkpoint body as the format defines it, written the plain way (the original
    to_snapshot: one msgpack of (next_ino, records)), records by inode number."""
    records = []
    for ino in sorted(state.inodes):
        inode = state.inodes[ino]
        if inode.directory is not None:
            body = [(name, child) for _, name, child in inode.directory.after(0)]
        elif inode.blocks is not None:
            flat = array("Q")
            for lblk, packed in inode.blocks.items():
                flat.append(lblk)
                flat.append(packed)
            body = flat.tobytes()
        else:
            body = inode.target
        records.append((inode.ino, inode.mode, inode.nlink, inode.uid, inode.gid, inode.rdev,
                        inode.size, inode.atime_ns, inode.mtime_ns, inode.ctime_ns, body,
                        inode.xattrs))
    return msgpack.packb((state.next_ino, records), use_bin_type=True)


def canonical(state: TreeState) -> dict:
    """What the state holds, whatever the cookies (which depend on history when they collide)."""
    return {"next_ino": state.next_ino, **{
        ino: (inode.attr(), inode.target, inode.xattrs, inode.blocks,
              dict(inode.directory.names) if inode.is_dir else None)
        for ino, inode in state.inodes.items()}}


def chunked(state: TreeState, budget: int, between=lambda: None, lsn: int = 7) -> bytes:
    """Capture ``state`` in chunks of ``budget``, calling ``between`` before every chunk."""
    capture = snapshot.begin_capture(state, lsn)
    assert state.capture is capture and capture.lsn == lsn
    parts = []
    while True:
        between()
        done, data = capture.next_chunk(budget)
        parts.append(data)
        if done:
            break
    assert state.capture is None, "a finished capture detaches itself"
    return b"".join(parts)


class Mutator:
    """Random valid redo operations against a state: every kind of change apply knows."""

    def __init__(self, state: TreeState, rng: random.Random) -> None:
        self.state, self.rng = state, rng
        self.dropped: list[int] = []

    def inodes(self, kind=None) -> list[int]:
        return sorted(ino for ino, inode in self.state.inodes.items()
                      if kind is None or stat.S_IFMT(inode.mode) == kind)

    def entries(self) -> list[tuple[int, bytes]]:
        return sorted((ino, name) for ino in self.inodes(stat.S_IFDIR)
                      for name in self.state.inodes[ino].directory.names)

    def op(self) -> list:
        rng, state = self.rng, self.state
        kind = rng.choice(["attrs", "create", "recreate", "drop", "put_entry", "drop_entry",
                           "target", "blocks", "truncate", "put_xattr", "drop_xattr"])
        dirs, files = self.inodes(stat.S_IFDIR), self.inodes(stat.S_IFREG)
        if kind == "attrs":
            inode = state.inodes[rng.choice(self.inodes())]
            return [inode.put_op(nlink=rng.randrange(1, 5), size=rng.randrange(1 << 20),
                                 mtime_ns=T0 + rng.randrange(10**9), uid=rng.randrange(5))]
        if kind in ("create", "recreate"):
            if kind == "recreate" and self.dropped:  # a number below the capture's end
                ino = self.dropped.pop(rng.randrange(len(self.dropped)))
            else:
                ino = state.next_ino
            mode = rng.choice([DIR, REG, LNK, FIFO])
            ops = [redo.PutInode(ino, mode, 1, 0, 0, 0, 0, T0, T0, T0),
                   redo.PutEntry(rng.choice(dirs), rng.choice(NAMES), ino)]
            if mode == LNK:
                ops.append(redo.PutTarget(ino, rng.randbytes(rng.randrange(1, 40))))
            return ops
        if kind == "drop":
            candidates = [ino for ino in self.inodes() if ino != ROOT_INO
                          and not (state.inodes[ino].is_dir and state.inodes[ino].directory.names)]
            if not candidates:
                return []
            ino = rng.choice(candidates)
            self.dropped.append(ino)
            return [redo.DropEntry(parent, name) for parent, name in self.entries()
                    if state.inodes[parent].directory.names[name] == ino] + [redo.DropInode(ino)]
        if kind == "put_entry":
            return [redo.PutEntry(rng.choice(dirs), rng.choice(NAMES), rng.choice(self.inodes()))]
        if kind == "drop_entry":
            entries = self.entries()
            return [redo.DropEntry(*rng.choice(entries))] if entries else []
        if kind == "target":
            links = self.inodes(stat.S_IFLNK)
            return [redo.PutTarget(rng.choice(links), rng.randbytes(9))] if links else []
        if not files and kind in ("blocks", "truncate"):
            return []
        if kind == "blocks":
            flat = []
            for _ in range(rng.randrange(1, 6)):
                flat += [rng.randrange(64), rng.randrange(1 << 32), rng.randrange(1 << 32)]
            return [redo.PutBlocks(rng.choice(files), tuple(flat))]
        if kind == "truncate":
            return [redo.TruncateBlocks(rng.choice(files), rng.randrange(64))]
        if kind == "put_xattr":
            return [redo.PutXattr(rng.choice(self.inodes()), rng.choice(XATTRS), rng.randbytes(5))]
        present = [(ino, name) for ino in self.inodes()
                   for name in (state.inodes[ino].xattrs or ())]
        return [redo.DropXattr(*rng.choice(present))] if present else []


def random_state(rng: random.Random, size: int) -> tuple[TreeState, Mutator]:
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    mutator = Mutator(state, rng)
    for _ in range(size):
        for op in mutator.op():
            state.apply(op)
    return state, mutator


def test_to_snapshot_is_the_checkpoint_format() -> None:
    rng = random.Random(1)
    state, _ = random_state(rng, 300)
    state.apply(redo.PutInode(state.next_ino + 5, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    state.apply(redo.PutInode(state.next_ino - 3, REG, 1, 0, 0, 0, 0, T0, T0, T0))  # out of order
    assert list(state.inodes) != sorted(state.inodes)
    assert snapshot.encode(state) == reference_snapshot(state) == chunked(state, 3)


def rng_mode(ino: int) -> int:
    return [DIR, REG, LNK, FIFO][ino % 4]


def test_inodes_out_of_number_order_are_captured_in_order() -> None:
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    for ino in range(2, 40):
        state.apply(redo.PutInode(ino, rng_mode(ino), 1, 0, 0, 0, ino, T0, T0, T0))
        state.apply(redo.PutEntry(ROOT_INO, b"name-%d" % ino, ino))
    state.apply(redo.DropInode(7))
    assert state.numbers_in_order
    assert snapshot.decode(snapshot.encode(state)).numbers_in_order
    next_ino, records = msgpack.unpackb(snapshot.encode(state))  # an older checkpoint's order
    shuffled = msgpack.packb((next_ino, records[1:] + records[:1]))
    loaded = snapshot.decode(shuffled)
    assert not loaded.numbers_in_order
    assert chunked(loaded, 2) == snapshot.encode(loaded) == snapshot.encode(state)
    state.apply(redo.PutInode(state.next_ino + 3, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    assert state.numbers_in_order
    state.apply(redo.PutInode(state.next_ino - 2, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    assert not state.numbers_in_order
    assert chunked(state, 2) == snapshot.encode(state)


@pytest.mark.parametrize("budget", [1, 2, 5, 64, 10_000])
def test_chunks_of_an_unchanging_state_are_to_snapshot(budget) -> None:
    state, _ = random_state(random.Random(budget), 400)
    big = state.next_ino
    state.apply(redo.PutInode(big, DIR, 2, 0, 0, 0, 0, T0, T0, T0))
    for i in range(700):  # a directory and a file bigger than a small chunk
        state.apply(redo.PutEntry(big, b"entry-%d" % i, ROOT_INO))
    state.apply(redo.PutInode(big + 1, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    state.apply(redo.PutBlocks(big + 1, tuple(v for i in range(900) for v in (i, i + 7, i * 3))))
    state.apply(redo.PutXattr(big + 1, b"user.x", b"y"))
    assert chunked(state, budget) == snapshot.encode(state) == reference_snapshot(state)


def test_fresh_and_empty_states() -> None:
    fresh = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    assert chunked(fresh, 1) == snapshot.encode(fresh)
    empty = TreeState()
    assert chunked(empty, 1) == snapshot.encode(empty) == msgpack.packb((2, []))


@pytest.fixture
def colliding_cookies(monkeypatch):
    """Names hashed to a handful of cookies: a name dropped and put again often takes
    another cookie than it had (the next free one)."""
    monkeypatch.setattr("razorfs.state.tree.name_cookie", lambda name: 1 + sum(name) % 7)


@pytest.mark.parametrize("seed", range(150))
def test_changes_between_chunks_do_not_reach_the_capture(seed, request) -> None:
    """Every kind of redo operation, on inodes already serialised, not yet serialised, being
    serialised in pieces, created or dropped since: the chunks are the state at the start."""
    if seed % 2:
        request.getfixturevalue("colliding_cookies")
    rng = random.Random(seed)
    state, mutator = random_state(rng, rng.randrange(5, 200))
    if seed % 3 == 0:  # a big directory and file, produced in pieces, changed in between
        big = state.next_ino
        for op in (redo.PutInode(big, DIR, 2, 0, 0, 0, 0, T0, T0, T0),
                   redo.PutInode(big + 1, REG, 1, 0, 0, 0, 0, T0, T0, T0),
                   redo.PutEntry(ROOT_INO, b"big", big), redo.PutEntry(big, b"file", big + 1),
                   redo.PutBlocks(big + 1, tuple(v for i in range(300) for v in (i, i, i)))):
            state.apply(op)
        for i in range(rng.randrange(100, 400)):
            state.apply(redo.PutEntry(big, b"e%d" % i, big + 1))
    expected = snapshot.encode(state)
    twin = snapshot.decode(expected)  # the same changes, without a capture

    def change() -> None:
        for _ in range(rng.randrange(4)):
            ops = mutator.op()
            for op in ops:
                assert sorted(state.apply(op)) == sorted(twin.apply(op))

    assert chunked(state, rng.choice([1, 2, 3, 7, 40]), change) == expected
    assert canonical(state) == canonical(twin), "the capture changed the live state"


@pytest.mark.parametrize("seed", range(20))
def test_a_big_directory_changed_while_it_is_produced_in_pieces(seed, colliding_cookies):
    rng = random.Random(seed)
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    big = 2
    state.apply(redo.PutInode(big, DIR, 2, 0, 0, 0, 0, T0, T0, T0))
    state.apply(redo.PutEntry(ROOT_INO, b"big", big))
    for ino in range(3, 8):
        state.apply(redo.PutInode(ino, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    names = [b"name-%d" % i for i in range(300)]
    for name in names:
        state.apply(redo.PutEntry(big, name, rng.randrange(3, 8)))
    state.apply(redo.PutXattr(big, b"user.x", b"1"))
    expected = snapshot.encode(state)
    twin = snapshot.decode(expected)
    gone: list[bytes] = []
    emptied = seed % 4 == 0  # the directory emptied and dropped halfway

    def change() -> None:
        ops = []
        for _ in range(rng.randrange(8)):
            kind = rng.randrange(5)
            if kind == 0 and names:  # drop a name
                name = names.pop(rng.randrange(len(names)))
                gone.append(name)
                ops.append(redo.DropEntry(big, name))
            elif kind == 1 and gone:  # put it back, maybe with another cookie
                name = gone.pop(rng.randrange(len(gone)))
                names.append(name)
                ops.append(redo.PutEntry(big, name, rng.randrange(3, 8)))
            elif kind == 2 and names:  # point a name elsewhere
                ops.append(redo.PutEntry(big, rng.choice(names), rng.randrange(3, 8)))
            elif kind == 3:  # a new name
                name = b"new-%d" % rng.randrange(1 << 20)
                if name not in names:
                    names.append(name)
                    ops.append(redo.PutEntry(big, name, 3))
            else:
                ops.append(redo.PutXattr(big, b"user.x", rng.randbytes(3)))
        if emptied and state.capture is not None and rng.random() < 0.2 and big in state.inodes:
            ops += [redo.DropEntry(big, name) for name in names] + [redo.DropEntry(ROOT_INO, b"big"),
                                                                  redo.DropInode(big)]
            names.clear()
        for op in ops:
            if big in state.inodes or not isinstance(op, (redo.PutEntry, redo.DropEntry, redo.PutXattr)):
                state.apply(op)
                twin.apply(op)

    assert chunked(state, rng.choice([1, 2, 5]), change) == expected
    assert canonical(state) == canonical(twin)


@pytest.mark.parametrize("seed", range(10))
def test_a_big_file_changed_while_it_is_produced_in_pieces(seed) -> None:
    rng = random.Random(seed)
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    big = 2
    state.apply(redo.PutInode(big, REG, 1, 0, 0, 0, 0, T0, T0, T0))
    state.apply(redo.PutEntry(ROOT_INO, b"big", big))
    lblks = rng.sample(range(5000), 1000)  # a map in no particular order
    state.apply(redo.PutBlocks(big, tuple(v for lblk in lblks for v in (lblk, lblk + 9, lblk))))
    expected = snapshot.encode(state)
    twin = snapshot.decode(expected)

    def change() -> None:
        if big not in state.inodes or rng.random() < 0.5:
            return
        kind = rng.randrange(5)
        if kind == 0:
            ops = [redo.PutBlocks(big, (rng.choice(lblks), 1, 2, rng.randrange(5000), 3, 4))]
        elif kind == 1:
            ops = [redo.TruncateBlocks(big, rng.randrange(5000))]
        elif kind == 2:
            ops = [redo.PutXattr(big, b"user.x", rng.randbytes(4))]
        elif kind == 3:
            ops = [state.inodes[big].put_op(size=rng.randrange(1 << 30))]
        else:
            ops = [redo.DropEntry(ROOT_INO, b"big"), redo.DropInode(big)]
        for op in ops:
            assert sorted(state.apply(op)) == sorted(twin.apply(op))

    assert chunked(state, 1, change) == expected
    assert canonical(state) == canonical(twin)


def test_copies_are_taken_once_and_released_as_records_go_out() -> None:
    state, _ = random_state(random.Random(5), 100)
    expected = snapshot.encode(state)
    capture = snapshot.begin_capture(state, 1)
    last = max(state.inodes)
    state.apply(state.inodes[last].put_op(nlink=99))
    copy = capture.saved[last]
    state.apply(state.inodes[last].put_op(nlink=98))
    assert capture.saved[last] is copy and copy.nlink != 98
    new = state.next_ino
    state.apply(redo.PutInode(new, REG, 1, 0, 0, 0, 0, T0, T0, T0))  # created after: not copied
    assert new not in capture.saved
    parts = []
    while not capture.done:
        parts.append(capture.next_chunk(3)[1])
        assert all(ino >= capture.low for ino in capture.saved)
        first_done = state.inodes[min(state.inodes)]  # already out: changes are not copied
        state.apply(first_done.put_op(uid=first_done.uid + 1))
    assert b"".join(parts) == expected and not capture.saved


def test_abandoned_capture_stops_copying_and_a_new_one_replaces_it() -> None:
    state, _ = random_state(random.Random(9), 100)
    first = snapshot.begin_capture(state, 3)
    first.next_chunk(2)
    state.end_capture()
    assert state.capture is None
    state.apply(state.inodes[max(state.inodes)].put_op(nlink=7))
    assert not first.saved, "an abandoned capture must cost nothing"
    second = snapshot.begin_capture(state, 4)
    third = snapshot.begin_capture(state, 5)  # one at a time: the newest wins
    assert state.capture is third and second.ident != third.ident != first.ident
    expected = snapshot.encode(state)
    assert chunked(state, 4) == expected


def test_lookup_counts_and_parents_are_not_part_of_records() -> None:
    state, _ = random_state(random.Random(3), 100)
    expected = snapshot.encode(state)
    capture = snapshot.begin_capture(state, 1)
    for inode in state.inodes.values():
        inode.lookups += 3
        inode.parent = 12345
    parts = []
    while not capture.done:
        parts.append(capture.next_chunk(2)[1])
    assert b"".join(parts) == expected
