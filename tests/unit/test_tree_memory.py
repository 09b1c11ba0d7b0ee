"""The memory-saving layout of the tree (issue 5: bytes per inode) keeps its behaviour: readdir
cookies as the hash-with-next-free rule gives them, checkpoints byte for byte, and no object
shared between inodes (an empty extent map, a timestamp, a mode) changing for more than one."""

from __future__ import annotations

import random
import stat

import msgpack
import pytest

from razorfs.state import redo, snapshot
from razorfs.state.tree import ROOT_INO, Directory, TreeState, name_cookie

T0 = 1_700_000_000_000_000_000
DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777
FIFO = stat.S_IFIFO | 0o600


def few_values(name: bytes) -> int:
    """A hash with seven values: most names collide."""
    return 1 + sum(name) % 7


def new_int(value: int) -> int:
    """``value`` as an int object of its own, as decoding a request or a WAL record makes."""
    return int(str(value))


def put(ino: int, mode: int, *, uid: int = 1000, times=(T0, T0, T0)) -> redo.PutInode:
    return redo.PutInode(new_int(ino), new_int(mode), 1, new_int(uid), new_int(2000), 0, 0,
                      *map(new_int, times))


class CookieModel:
    """The readdir cookie rule, the plain way: a name takes its hash, or the next cookie no
    other entry holds, and keeps it until it is dropped."""

    def __init__(self, hash_name) -> None:
        self.hash_name = hash_name
        self.cookies: dict[bytes, int] = {}

    def put(self, name: bytes) -> None:
        if name not in self.cookies:
            cookie = self.hash_name(name)
            while cookie in self.cookies.values():
                cookie += 1
            self.cookies[name] = cookie

    def drop(self, name: bytes) -> None:
        del self.cookies[name]

    def listing(self) -> list[tuple[int, bytes]]:
        return sorted((cookie, name) for name, cookie in self.cookies.items())


def listing(directory: Directory, after: int = 0) -> list[tuple[int, bytes]]:
    return [(cookie, name) for cookie, name, _ in directory.after(after)]


# ---- directory cookies --------------------------------------------------------------------------


def test_a_colliding_name_takes_the_next_free_cookie_and_keeps_it() -> None:
    directory = Directory(few_values)
    directory.put(b"b", 10)  # hash 1 + 98 % 7 = 1
    directory.put(b"i", 11)  # 105: 1 too, takes 2
    directory.put(b"c", 12)  # 99: 2, taken by i: takes 3
    assert listing(directory) == [(1, b"b"), (2, b"i"), (3, b"c")]
    assert [directory.cookie(name) for name in (b"b", b"i", b"c")] == [1, 2, 3]
    directory.drop(b"b")
    directory.put(b"i", 13)  # replaced: keeps its place although its hash is free again
    assert list(directory.after(0)) == [(2, b"i", 13), (3, b"c", 12)]
    directory.drop(b"i")
    assert listing(directory) == [(3, b"c")]
    assert directory.displaced is not None  # c's cookie still is not its hash
    directory.drop(b"c")
    assert directory.displaced is None and listing(directory) == []
    directory.put(b"c", 14)
    assert listing(directory) == [(2, b"c")]


@pytest.mark.parametrize("seed", range(40))
def test_cookies_follow_the_rule_through_puts_and_drops(seed) -> None:
    rng = random.Random(seed)
    pool = [bytes([rng.randrange(97, 123)]) * rng.randrange(1, 3) + b"%d" % i
            for i in range(30)]
    directory, model = Directory(few_values), CookieModel(few_values)
    for _ in range(300):
        name = rng.choice(pool)
        if name in directory.names and rng.random() < 0.5:
            directory.drop(name)
            model.drop(name)
        else:
            directory.put(name, rng.randrange(2, 50))
            model.put(name)
        assert listing(directory) == model.listing()
    assert all(directory.cookie(name) == cookie for name, cookie in model.cookies.items())
    everything = model.listing()
    for index, (cookie, _) in enumerate(everything):  # readdir resumes after any cookie
        assert listing(directory, cookie) == everything[index + 1:]


@pytest.mark.parametrize("hash_name", [few_values, name_cookie], ids=["colliding", "real"])
def test_filling_a_directory_is_putting_each_entry_in_turn(hash_name) -> None:
    rng = random.Random(3)
    grown = Directory(hash_name)
    for i in range(200):
        grown.put(b"e%d" % rng.randrange(150), i)
        if rng.random() < 0.3 and grown.names:
            grown.drop(rng.choice(list(grown.names)))
    as_checkpointed = tuple((name, ino) for _, name, ino in grown.after(0))
    shuffled = list(as_checkpointed)
    rng.shuffle(shuffled)
    for entries in (as_checkpointed, tuple(shuffled), as_checkpointed + as_checkpointed[:3]):
        filled, put_one_by_one = Directory(hash_name), Directory(hash_name)
        filled.fill(entries)
        for name, ino in entries:
            put_one_by_one.put(name, ino)
        assert list(filled.after(0)) == list(put_one_by_one.after(0))
        assert filled.displaced == put_one_by_one.displaced


# ---- checkpoints --------------------------------------------------------------------------------


def varied_state() -> TreeState:
    state = TreeState.fresh(uid=1000, gid=100, now_ns=T0)
    state.apply(put(2, DIR, times=(T0, T0 + 1, T0 + 1)))
    state.apply(redo.PutEntry(ROOT_INO, b"dir", 2))
    for i in range(300):  # a directory big enough to be produced in pieces
        ino = 10 + i
        times = (T0 + i,) * 3 if i % 2 == 0 else (T0 + i, T0, T0 + i)  # created, or touched
        state.apply(put(ino, REG, uid=1000 + i % 3, times=times))
        state.apply(redo.PutEntry(2, b"f%d" % i, ino))
    state.apply(redo.PutBlocks(10, (0, 5, 6)))
    state.apply(redo.PutBlocks(11, (0, 7, 8, 3, 9, 10, 1, 11, 12)))
    state.apply(redo.PutXattr(12, b"user.a", b"x"))
    state.apply(redo.PutEntry(ROOT_INO, b"hardlink", 13))
    state.apply(put(5, LNK))  # below numbers in use: inodes out of number order
    state.apply(redo.PutTarget(5, b"dir/f1"))
    state.apply(redo.PutEntry(ROOT_INO, b"link", 5))
    state.apply(put(6, FIFO, times=(T0 + 3, T0 + 2, T0 + 1)))
    state.apply(redo.PutEntry(2, b"pipe", 6))
    state.apply(put(7, DIR))
    state.apply(redo.PutEntry(2, b"empty", 7))
    return state


def test_a_loaded_checkpoint_gives_back_the_same_bytes() -> None:
    state = varied_state()
    body = snapshot.encode(state)
    loaded = snapshot.decode(body)
    assert snapshot.encode(loaded) == body
    assert snapshot.encode(snapshot.decode(snapshot.encode(loaded))) == body
    changes = [redo.PutBlocks(12, (4, 1, 2)), redo.TruncateBlocks(11, 1), redo.TruncateBlocks(10, 0),
               redo.DropEntry(2, b"f7"), redo.PutEntry(7, b"f7", 17), put(17, REG, uid=7),
               redo.PutInode(400, DIR, 2, 0, 0, 0, 0, T0, T0, T0), redo.PutEntry(7, b"d", 400)]
    for op in changes:
        assert state.apply(op) == loaded.apply(op)
    assert snapshot.encode(loaded) == snapshot.encode(state)
    assert loaded.inodes[400].parent == 7 and loaded.inodes[7].parent == 2


def test_a_checkpoint_body_cut_short_or_too_long_is_refused() -> None:
    """Records are read one at a time, so the end of the body is checked apart."""
    state = TreeState.fresh(uid=0, gid=0, now_ns=T0)
    for ino, mode, name in [(2, DIR, b"d"), (3, REG, b"f"), (4, LNK, b"l")]:
        state.apply(put(ino, mode))
        state.apply(redo.PutEntry(ROOT_INO, name, ino))
    state.apply(redo.PutBlocks(3, (0, 1, 2, 1, 3, 4)))
    body = snapshot.encode(state)
    for cut in range(len(body)):
        with pytest.raises(ValueError):
            snapshot.decode(body[:cut])
    with pytest.raises(ValueError):
        snapshot.decode(body + msgpack.packb(0))
    head = b"\x92" + msgpack.packb(state.next_ino)
    records = body[len(head) + 1:]
    assert body == head + bytes((0x90 | 4,)) + records
    for count in (3, 5):
        with pytest.raises(ValueError):
            snapshot.decode(head + bytes((0x90 | count,)) + records)
    with pytest.raises(ValueError):
        snapshot.decode(msgpack.packb((state.next_ino, [], 0)))


def test_a_capture_keeps_an_empty_file_empty_when_it_gets_its_first_block() -> None:
    state = varied_state()
    expected = snapshot.encode(state)
    capture = snapshot.begin_capture(state, 1)
    parts = [capture.next_chunk(1)[1]]
    state.apply(redo.PutBlocks(300, (0, 1, 2)))  # an empty file not produced yet
    state.apply(redo.PutBlocks(20, (0, 3, 4)))
    while not capture.done:
        parts.append(capture.next_chunk(3)[1])
    assert b"".join(parts) == expected


# ---- objects shared between inodes --------------------------------------------------------------


def loaded_and_live() -> list[TreeState]:
    live = varied_state()
    return [snapshot.decode(snapshot.encode(live)), live]


@pytest.mark.parametrize("origin", ["loaded", "live"])
def test_writing_to_an_empty_file_leaves_the_other_empty_files_empty(origin) -> None:
    state = dict(zip(["loaded", "live"], loaded_and_live()))[origin]
    empty = [ino for ino, inode in state.inodes.items()
             if inode.blocks is not None and not inode.blocks]
    first, others = empty[0], empty[1:]
    state.apply(redo.PutBlocks(first, (2, 5, 6)))
    assert dict(state.inodes[first].blocks) == {2: 5 << 32 | 6}
    assert all(not state.inodes[ino].blocks for ino in others)
    assert state.inodes[first].attr().blocks > 0
    assert state.inodes[others[0]].attr().blocks == 0
    with pytest.raises(TypeError):  # the shared empty map refuses a write that bypasses apply
        state.inodes[others[0]].blocks[0] = 1
    assert state.apply(redo.TruncateBlocks(first, 0)) == [5]
    state.apply(redo.PutBlocks(others[0], (0, 8, 9)))
    assert not state.inodes[first].blocks
    assert dict(state.inodes[others[0]].blocks) == {0: 8 << 32 | 9}
    assert all(not state.inodes[ino].blocks for ino in others[1:])


@pytest.mark.parametrize("origin", ["loaded", "live"])
def test_equal_timestamps_are_one_object_and_still_change_one_by_one(origin) -> None:
    state = dict(zip(["loaded", "live"], loaded_and_live()))[origin]
    touched = state.inodes[11]
    assert (touched.atime_ns, touched.mtime_ns, touched.ctime_ns) == (T0 + 1, T0, T0 + 1)
    assert touched.atime_ns is touched.ctime_ns
    never_changed = state.inodes[12]
    assert never_changed.atime_ns == T0 + 2
    assert never_changed.atime_ns is never_changed.mtime_ns is never_changed.ctime_ns
    state.apply(never_changed.put_op(mtime_ns=new_int(T0 + 99)))
    assert (never_changed.atime_ns, never_changed.mtime_ns, never_changed.ctime_ns) == (
        T0 + 2, T0 + 99, T0 + 2)
    assert never_changed.atime_ns is never_changed.ctime_ns
    distinct = state.inodes[6]
    assert (distinct.atime_ns, distinct.mtime_ns, distinct.ctime_ns) == (T0 + 3, T0 + 2, T0 + 1)


@pytest.mark.parametrize("origin", ["loaded", "live"])
def test_modes_owners_and_entry_numbers_are_shared(origin) -> None:
    state = dict(zip(["loaded", "live"], loaded_and_live()))[origin]
    files = [state.inodes[ino] for ino in (11, 14, 17)]  # uid 1001 each
    assert files[0].mode is files[1].mode is files[2].mode == REG
    assert files[0].uid is files[1].uid is files[2].uid == 1001
    assert files[0].gid is files[1].gid is files[2].gid == 2000
    directory = state.inodes[2].directory
    assert all(directory.names[b"f%d" % (inode.ino - 10)] is inode.ino for inode in files)
    state.apply(files[0].put_op(uid=new_int(5000)))
    assert files[0].uid == 5000 and files[1].uid == 1001
