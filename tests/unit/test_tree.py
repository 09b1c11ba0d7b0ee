"""TreeState.apply, Directory cookies, snapshots, and the msgpack message schema."""

from __future__ import annotations

import random
import stat

import pytest

from razorfs.state import redo, snapshot
from razorfs.actors import messages as m
from razorfs.storage.formats import BLOCK_SIZE
from razorfs.state.tree import (
    DOT_COOKIE, DOTDOT_COOKIE, ROOT_INO, Directory, ReplayError, TreeState, name_cookie)

T0 = 1_700_000_000_000_000_000
DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777
FIFO = stat.S_IFIFO | 0o600


def put(ino: int, mode: int, nlink: int = 1, size: int = 0, uid: int = 1000) -> redo.PutInode:
    return redo.PutInode(ino, mode, nlink, uid, 100, 0, size, T0 + 1, T0 + 2, T0 + 3)


@pytest.fixture
def state() -> TreeState:
    return TreeState.fresh(uid=1000, gid=100, now_ns=T0)


def make_file(state: TreeState, ino: int, name: bytes, parent: int = ROOT_INO) -> None:
    state.apply(put(ino, REG))
    state.apply(redo.PutEntry(parent, name, ino))


def names(state: TreeState, ino: int) -> dict[bytes, int]:
    return {name: child for _, name, child in state.get(ino).directory.after(0)}


# ---- apply --------------------------------------------------------------------------------------


def test_fresh_state_has_only_the_root_directory(state) -> None:
    root = state.get(ROOT_INO)
    assert list(state.inodes) == [ROOT_INO]
    assert root.is_dir and stat.S_ISDIR(root.mode) and stat.S_IMODE(root.mode) == 0o755
    assert root.attr() == (ROOT_INO, DIR, 2, 1000, 100, 0, 0, 0, T0, T0, T0)
    assert root.parent == ROOT_INO and names(state, ROOT_INO) == {}
    assert state.next_ino == 2
    with pytest.raises(KeyError):
        state.get(2)


def test_put_inode_creates_then_updates_attributes(state) -> None:
    assert state.apply(put(7, REG, size=10)) == []
    assert state.get(7).attr() == (7, REG, 1, 1000, 100, 0, 10, 0, T0 + 1, T0 + 2, T0 + 3)
    assert state.next_ino == 8
    state.apply(redo.PutInode(7, stat.S_IFREG | 0o600, 3, 0, 0, 0, 99, 1, 2, 3))
    assert state.get(7).attr() == (7, stat.S_IFREG | 0o600, 3, 0, 0, 0, 99, 0, 1, 2, 3)
    state.apply(put(3, REG))
    assert state.next_ino == 8  # never goes back


def test_put_inode_cannot_change_the_type(state) -> None:
    state.apply(put(2, REG))
    with pytest.raises(ReplayError, match="cannot change type"):
        state.apply(put(2, DIR))
    assert stat.S_ISREG(state.get(2).mode)


def test_put_and_drop_entries(state) -> None:
    make_file(state, 2, b"a")
    state.apply(put(3, DIR, nlink=2))
    assert state.apply(redo.PutEntry(ROOT_INO, b"d", 3)) == []
    make_file(state, 4, b"inner", parent=3)
    assert names(state, ROOT_INO) == {b"a": 2, b"d": 3}
    assert names(state, 3) == {b"inner": 4}
    assert state.get(3).parent == ROOT_INO
    state.apply(redo.PutEntry(ROOT_INO, b"a", 4))  # replace: a now points at inode 4
    assert state.apply(redo.DropEntry(3, b"inner")) == []
    assert names(state, ROOT_INO) == {b"d": 3, b"a": 4} and names(state, 3) == {}


def test_put_entry_of_a_directory_moves_its_parent_pointer(state) -> None:
    state.apply(put(2, DIR, nlink=2))
    state.apply(put(3, DIR, nlink=2))
    state.apply(redo.PutEntry(ROOT_INO, b"two", 2))
    state.apply(redo.PutEntry(2, b"three", 3))
    assert state.get(3).parent == 2
    state.apply(redo.PutEntry(ROOT_INO, b"moved", 3))
    state.apply(redo.DropEntry(2, b"three"))
    assert state.get(3).parent == ROOT_INO


def test_put_target_sets_a_symlink_target(state) -> None:
    state.apply(put(2, LNK))
    assert state.apply(redo.PutTarget(2, b"../some/where")) == []
    assert state.get(2).target == b"../some/where"


def test_put_blocks_maps_and_returns_overwritten_physical_blocks(state) -> None:
    make_file(state, 2, b"f")
    top = 2**32 - 1  # the largest physical block number and CRC an extent map holds
    assert state.apply(redo.PutBlocks(2, (0, 100, 0xAAAA, 1, 101, 0xBBBB, 5, top, top))) == []
    assert state.get(2).attr()[7] == 3 * (BLOCK_SIZE // 512)
    freed = state.apply(redo.PutBlocks(2, (1, 200, 1, 2, 201, 2, 0, 202, 3)))
    assert sorted(freed) == [100, 101]
    assert sorted(state.used_blocks()) == [(200, 2, 1, 1), (201, 2, 2, 2), (202, 2, 0, 3),
                                           (top, 2, 5, top)]


def test_truncate_blocks_returns_the_dropped_physical_blocks(state) -> None:
    make_file(state, 2, b"f")
    state.apply(redo.PutBlocks(2, (0, 10, 0, 1, 11, 0, 2, 12, 0, 7, 17, 0)))
    assert sorted(state.apply(redo.TruncateBlocks(2, 2))) == [12, 17]
    assert sorted(p for p, *_ in state.used_blocks()) == [10, 11]
    assert state.apply(redo.TruncateBlocks(2, 5)) == []
    assert sorted(state.apply(redo.TruncateBlocks(2, 0))) == [10, 11]
    assert state.get(2).attr()[7] == 0


def test_xattrs_put_replace_and_drop(state) -> None:
    make_file(state, 2, b"f")
    assert state.get(2).xattrs is None
    state.apply(redo.PutXattr(2, b"user.a", b"1"))
    state.apply(redo.PutXattr(2, b"user.b", b""))
    state.apply(redo.PutXattr(2, b"user.a", b"2"))
    assert state.get(2).xattrs == {b"user.a": b"2", b"user.b": b""}
    assert state.apply(redo.DropXattr(2, b"user.a")) == []
    assert state.get(2).xattrs == {b"user.b": b""}
    state.apply(redo.DropXattr(2, b"user.b"))
    assert state.get(2).xattrs is None
    with pytest.raises(ReplayError):
        state.apply(redo.DropXattr(2, b"user.b"))


def test_drop_inode_returns_all_its_blocks(state) -> None:
    make_file(state, 2, b"f")
    state.apply(redo.PutBlocks(2, (0, 50, 0, 1, 51, 0, 9, 70, 0)))
    state.apply(redo.DropEntry(ROOT_INO, b"f"))
    assert sorted(state.apply(redo.DropInode(2))) == [50, 51, 70]
    assert 2 not in state.inodes and list(state.used_blocks()) == []
    state.apply(put(3, LNK))
    assert state.apply(redo.DropInode(3)) == []


def test_drop_inode_of_a_non_empty_directory_is_refused(state) -> None:
    state.apply(put(2, DIR, nlink=2))
    make_file(state, 3, b"x", parent=2)
    with pytest.raises(ReplayError, match="not empty"):
        state.apply(redo.DropInode(2))


@pytest.mark.parametrize("op", [
    redo.PutEntry(ROOT_INO, b"x", 99),        # missing child
    redo.PutEntry(99, b"x", ROOT_INO),        # missing parent
    redo.DropEntry(99, b"x"),
    redo.DropEntry(ROOT_INO, b"no such name"),
    redo.PutTarget(99, b"t"),
    redo.PutBlocks(99, (0, 1, 0)),
    redo.TruncateBlocks(99, 0),
    redo.PutXattr(99, b"user.a", b"v"),
    redo.DropXattr(99, b"user.a"),
    redo.DropInode(99),
], ids=lambda op: type(op).__name__)
def test_op_on_a_missing_inode_or_entry_raises_replay_error(state, op) -> None:
    with pytest.raises(ReplayError, match="cannot apply"):
        state.apply(op)


def test_op_on_an_inode_of_the_wrong_kind_raises_replay_error(state) -> None:
    make_file(state, 2, b"f")
    with pytest.raises(ReplayError):
        state.apply(redo.PutEntry(2, b"x", 2))  # a regular file has no entries
    with pytest.raises(ReplayError):
        state.apply(redo.PutBlocks(ROOT_INO, (0, 1, 0)))  # a directory has no blocks


def test_put_blocks_with_an_incomplete_triple_raises_replay_error(state) -> None:
    make_file(state, 2, b"f")
    with pytest.raises(ReplayError):
        state.apply(redo.PutBlocks(2, (0, 100)))


def test_apply_refuses_messages_that_are_not_redo_operations(state) -> None:
    with pytest.raises(ReplayError, match="Remove is not a redo operation"):
        state.apply(m.Remove(ROOT_INO, b"x", False))


# ---- directory cookies --------------------------------------------------------------------------


def test_a_name_keeps_its_cookie_when_replaced_or_removed_and_created_again() -> None:
    directory = Directory()
    for i, name in enumerate([b"a", b"b", b"c"]):
        directory.put(name, 10 + i)
    listing = list(directory.after(0))
    assert sorted(name for _, name, _ in listing) == [b"a", b"b", b"c"]
    assert [cookie for cookie, _, _ in listing] == sorted(name_cookie(n) for n in (b"a", b"b", b"c"))
    cookie_of = {name: cookie for cookie, name, _ in listing}
    directory.put(b"a", 20)  # replaced by a rename: same place
    directory.drop(b"b")
    directory.put(b"b", 21)  # removed and created again: same place
    assert list(directory.after(0)) == sorted(
        [(cookie_of[b"a"], b"a", 20), (cookie_of[b"b"], b"b", 21), (cookie_of[b"c"], b"c", 12)])
    last = max(cookie_of.values())
    assert list(directory.after(last)) == []


def test_no_name_takes_the_cookie_of_a_dot_entry(monkeypatch) -> None:
    """readdir lists "." and ".." at cookies 1 and 2 (issue 18): a name whose hash is the
    smallest there is still comes after them, and so does one displaced by a collision."""
    class ZeroHash:
        def digest(self) -> bytes:
            return bytes(8)

    monkeypatch.setattr("razorfs.state.tree.hashlib.blake2b", lambda *args, **kwargs: ZeroHash())
    assert DOT_COOKIE < DOTDOT_COOKIE < name_cookie(b"anything")
    directory = Directory()
    directory.put(b"a", 10)
    directory.put(b"b", 11)  # the same hash: the next free cookie
    assert [cookie for cookie, _, _ in directory.after(0)] == [DOTDOT_COOKIE + 1, DOTDOT_COOKIE + 2]
    assert [name for _, name, _ in directory.after(DOTDOT_COOKIE)] == [b"a", b"b"]


def test_readdir_by_cookie_is_stable_while_entries_are_added_and_removed() -> None:
    rng = random.Random(7)
    directory = Directory()
    initial = [f"f{i:04d}".encode() for i in range(200)]
    for i, name in enumerate(initial):
        directory.put(name, 100 + i)
    stable = set(rng.sample(initial, 50))  # never touched while the listing runs
    churn = [name for name in initial if name not in stable]
    seen: list[bytes] = []
    cookie, drops, serial = 0, 0, 0
    while True:
        page = []
        for entry in directory.after(cookie):
            page.append(entry)
            if len(page) == 7:
                break
        if not page:
            break
        cookie = page[-1][0]
        seen.extend(name for _, name, _ in page)
        for _ in range(rng.randint(0, 12)):  # mutate between two readdir calls
            before = len(directory.order)
            roll = rng.random()
            if churn and roll < 0.7:
                directory.drop(churn.pop(rng.randrange(len(churn))))
            elif churn and roll < 0.9:
                directory.put(rng.choice(churn), 1)  # re-insert an existing name
            else:
                serial += 1
                churn.append(f"new{serial}".encode())
                directory.put(churn[-1], 2)
            drops += len(directory.order) < before
    assert drops > 0  # entries were dropped during the listing, not only added
    counts = {name: seen.count(name) for name in stable}
    assert all(count == 1 for count in counts.values()), counts


# ---- snapshots ----------------------------------------------------------------------------------


def populated() -> TreeState:
    state = TreeState.fresh(uid=1000, gid=100, now_ns=T0, mode=0o700)
    state.apply(put(2, DIR, nlink=3))
    state.apply(redo.PutEntry(ROOT_INO, b"home", 2))
    state.apply(put(3, DIR, nlink=2))
    state.apply(redo.PutEntry(2, b"user", 3))
    state.apply(put(4, REG, nlink=2, size=3 * BLOCK_SIZE + 5))
    state.apply(redo.PutEntry(3, b"data.bin", 4))
    state.apply(redo.PutEntry(ROOT_INO, b"hardlink", 4))
    state.apply(redo.PutBlocks(4, (0, 7, 0xDEADBEEF, 1, 2**32 - 1, 0, 3, 9, 0xFFFFFFFF)))
    state.apply(redo.PutXattr(4, b"user.tag", b"\x00\xffbinary"))
    state.apply(redo.PutXattr(4, b"security.selinux", b"ctx"))
    state.apply(put(5, LNK, size=11))
    state.apply(redo.PutTarget(5, b"../home/u\xe9"))
    state.apply(redo.PutEntry(3, b"link", 5))
    state.apply(put(6, FIFO))
    state.apply(redo.PutEntry(2, b"pipe", 6))
    state.apply(redo.PutXattr(2, b"user.dir", b"yes"))
    state.apply(put(7, DIR, nlink=2))  # created in root, then moved under /home
    state.apply(redo.PutEntry(ROOT_INO, b"tmp", 7))
    state.apply(redo.PutEntry(2, b"moved", 7))
    state.apply(redo.DropEntry(ROOT_INO, b"tmp"))
    state.apply(put(8, REG))  # an empty file
    state.apply(redo.PutEntry(ROOT_INO, b"empty", 8))
    state.apply(put(30, REG))  # raises next_ino, then goes away
    state.apply(redo.DropInode(30))
    return state


def describe(state: TreeState) -> dict:
    out = {"next_ino": state.next_ino}
    for ino, inode in state.inodes.items():
        out[ino] = (
            inode.attr(), inode.target, inode.xattrs, inode.blocks,
            [(name, child) for _, name, child in inode.directory.after(0)]
            if inode.is_dir else None,
            inode.parent if inode.is_dir else None,
        )
    return out


def test_snapshot_roundtrip_preserves_everything() -> None:
    original = populated()
    body = snapshot.encode(original)
    copy = snapshot.decode(body)
    assert describe(copy) == describe(original)
    assert copy.next_ino == 31
    assert copy.get(7).parent == 2 and copy.get(3).parent == 2 and copy.get(2).parent == ROOT_INO
    assert copy.get(ROOT_INO).parent == ROOT_INO
    assert copy.get(5).target == b"../home/u\xe9"
    assert copy.get(4).xattrs == {b"user.tag": b"\x00\xffbinary", b"security.selinux": b"ctx"}
    assert sorted(copy.used_blocks()) == sorted(original.used_blocks())
    assert snapshot.encode(copy) == body


def test_snapshot_of_a_fresh_state_roundtrips() -> None:
    fresh = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    assert describe(snapshot.decode(snapshot.encode(fresh))) == describe(fresh)


def test_state_restored_from_a_snapshot_keeps_applying_ops() -> None:
    copy = snapshot.decode(snapshot.encode(populated()))
    assert sorted(copy.apply(redo.TruncateBlocks(4, 1))) == [9, 2**32 - 1]
    make_file(copy, copy.next_ino, b"another")
    assert names(copy, ROOT_INO)[b"another"] == 31 and copy.next_ino == 32
