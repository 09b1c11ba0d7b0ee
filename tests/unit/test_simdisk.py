"""SimDisk: the in-memory disk that loses what was not made durable."""

from __future__ import annotations

import errno
import random
import threading

import pytest

from razorfs.storage.interface import SpaceInfo
from razorfs.storage.simdisk import SimDisk


def tree(disk: SimDisk, path: str = "") -> dict[str, bytes | None]:
    """Every path of the disk: file -> content, directory -> None."""
    out: dict[str, bytes | None] = {}
    for name in disk.listdir(path):
        child = f"{path}/{name}" if path else name
        try:
            out[child] = disk.read_file(child)
        except IsADirectoryError:
            out[child] = None
            out.update(tree(disk, child))
    return out


def durable_file(disk: SimDisk, path: str, data: bytes = b"") -> None:
    """Create ``path`` with ``data`` and make both its content and its name durable."""
    with disk.open(path, create=True) as f:
        f.pwrite(0, data)
        f.fsync()
    disk.fsync_dir(path.rpartition("/")[0])


def write(disk: SimDisk, path: str, offset: int, data: bytes) -> None:
    with disk.open(path) as f:
        f.pwrite(offset, data)


# -- basic file system behaviour ----------------------------------------------------------------


def test_files_and_directories() -> None:
    disk = SimDisk()
    assert disk.exists("") and disk.listdir("") == []
    with pytest.raises(FileNotFoundError):
        disk.open("missing")
    with pytest.raises(FileNotFoundError):
        disk.open("nodir/file", create=True)
    disk.mkdir("wal")
    disk.mkdir("wal")  # exist_ok
    with disk.open("wal/0002.wal", create=True) as f:
        f.pwrite(10, b"xy")  # past the end: zero-filled hole
        assert f.size() == 12
        assert f.pread(0, 100) == bytes(10) + b"xy"
        f.truncate(11)
        assert f.pread(8, 10) == b"\0\0x"
    with disk.open("wal/0001.wal", create=True):
        pass
    assert disk.listdir("wal") == ["0001.wal", "0002.wal"]
    assert disk.exists("wal/0001.wal") and not disk.exists("wal/0003.wal")
    disk.rename("wal/0002.wal", "wal/0001.wal")
    assert disk.listdir("wal") == ["0001.wal"]
    assert disk.read_file("wal/0001.wal") == bytes(10) + b"x"
    disk.unlink("wal/0001.wal")
    assert disk.listdir("wal") == []
    with pytest.raises(FileNotFoundError):
        disk.unlink("wal/0001.wal")
    with pytest.raises(IsADirectoryError):
        disk.open("wal")
    durable_file(disk, "plain")
    with pytest.raises(NotADirectoryError):
        disk.listdir("plain")


def test_open_handle_survives_rename_and_unlink() -> None:
    disk = SimDisk()
    f = disk.open("a", create=True)
    disk.rename("a", "b")
    f.pwrite(0, b"moved")
    assert disk.read_file("b") == b"moved"
    disk.unlink("b")
    f.pwrite(5, b"!")
    assert f.pread(0, 10) == b"moved!"
    f.close()
    with pytest.raises(OSError) as info:
        f.size()
    assert info.value.errno == errno.EBADF


def test_counters() -> None:
    disk = SimDisk()
    with disk.open("f", create=True) as f:
        f.pwrite(0, b"12345")
        f.fsync()
        assert f.pread(1, 10) == b"2345"
    disk.fsync_dir("")
    c = disk.counters
    assert (c.fsyncs, c.bytes_written, c.bytes_read) == (2, 5, 4)


def test_threads() -> None:
    disk = SimDisk()
    f = disk.open("f", create=True)

    def worker(i: int) -> None:
        for j in range(100):
            f.pwrite((i * 100 + j) * 4, i.to_bytes(4, "big"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = f.pread(0, f.size())
    assert data == b"".join(i.to_bytes(4, "big") * 100 for i in range(8))


# -- crash: what survives ------------------------------------------------------------------------


def test_unsynced_write_is_lost() -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"old")
    write(disk, "f", 0, b"new and longer")
    assert disk.read_file("f") == b"new and longer"
    assert disk.crash().read_file("f") == b"old"
    assert disk.read_file("f") == b"new and longer"  # the crashed-from disk is untouched


def test_fsynced_data_survives() -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"old")
    with disk.open("f") as f:
        f.pwrite(3, b"+more")
        f.fsync()
    assert disk.crash().read_file("f") == b"old+more"


def test_unsynced_truncate_is_lost() -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"keep me")
    with disk.open("f") as f:
        f.truncate(0)
    assert disk.crash().read_file("f") == b"keep me"


def test_new_file_needs_fsync_dir() -> None:
    disk = SimDisk()
    disk.mkdir("wal")
    disk.fsync_dir("")
    with disk.open("wal/0001.wal", create=True) as f:
        f.pwrite(0, b"data")
        f.fsync()
    assert disk.crash().listdir("wal") == []
    disk.fsync_dir("wal")
    assert tree(disk.crash()) == {"wal": None, "wal/0001.wal": b"data"}


def test_new_directory_needs_fsync_dir_of_parent() -> None:
    disk = SimDisk()
    disk.mkdir("d")
    durable_file(disk, "d/f", b"x")
    assert tree(disk.crash()) == {}
    disk.fsync_dir("")
    assert tree(disk.crash()) == {"d": None, "d/f": b"x"}


def test_rename_is_undone_without_fsync_dir() -> None:
    disk = SimDisk()
    durable_file(disk, "a", b"A")
    durable_file(disk, "b", b"B")
    disk.rename("a", "b")
    assert tree(disk) == {"b": b"A"}
    assert tree(disk.crash()) == {"a": b"A", "b": b"B"}
    disk.fsync_dir("")
    assert tree(disk.crash()) == {"b": b"A"}


def test_unlink_is_undone_without_fsync_dir() -> None:
    disk = SimDisk()
    durable_file(disk, "a", b"A")
    disk.unlink("a")
    assert tree(disk.crash()) == {"a": b"A"}
    disk.fsync_dir("")
    assert tree(disk.crash()) == {}


def test_move_between_directories_needs_both_fsync_dirs() -> None:
    disk = SimDisk()
    disk.mkdir("x")
    disk.mkdir("y")
    disk.fsync_dir("")
    durable_file(disk, "x/f", b"F")
    disk.rename("x/f", "y/f")
    disk.fsync_dir("y")
    # Only the new directory was synced: the file shows under both names.
    assert tree(disk.crash()) == {"x": None, "x/f": b"F", "y": None, "y/f": b"F"}
    disk.fsync_dir("x")
    assert tree(disk.crash()) == {"x": None, "y": None, "y/f": b"F"}


def test_crashed_disk_is_all_durable() -> None:
    disk = SimDisk(capacity=12345)
    durable_file(disk, "f", b"12")
    write(disk, "f", 2, b"34")
    with disk.open("g", create=True):
        pass
    crashed = disk.crash(random.Random(3), keep_unsynced=True)
    assert crashed.capacity == 12345
    assert tree(crashed.crash()) == tree(crashed)


# -- crash with keep_unsynced: what may survive --------------------------------------------------


def pending_disk() -> SimDisk:
    """A durable empty-ish file with 8 unsynced one-byte writes, plus an unsynced new file."""
    disk = SimDisk()
    durable_file(disk, "f", b"........")
    with disk.open("f") as f:
        for i in range(8):
            f.pwrite(i, b"%d" % i)
    durable_file(disk, "new", b"N")
    disk.unlink("new")
    with disk.open("new", create=True) as f:
        f.pwrite(0, b"M")
        f.fsync()
    return disk


def test_keep_unsynced_is_deterministic_per_seed() -> None:
    disk = pending_disk()
    for seed in range(10):
        first = tree(disk.crash(random.Random(seed), keep_unsynced=True))
        assert tree(disk.crash(random.Random(seed), keep_unsynced=True)) == first


def test_keep_unsynced_varies_across_seeds() -> None:
    disk = pending_disk()
    outcomes = [tree(disk.crash(random.Random(seed), keep_unsynced=True)) for seed in range(64)]
    contents = {o["f"] for o in outcomes}
    assert len(contents) > 10
    for content in contents:
        # Each pending write independently made it or not.
        assert all(content[i : i + 1] in (b".", b"%d" % i) for i in range(8))
    for i in range(8):
        assert {c[i : i + 1] for c in contents} == {b".", b"%d" % i}
    # The unsynced unlink and re-create of "new": neither, the unlink alone, or both landed.
    assert {o.get("new") for o in outcomes} == {b"N", None, b"M"}


def test_keep_unsynced_applies_ops_in_order() -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"")
    with disk.open("f") as f:
        f.pwrite(0, b"aaaa")
        f.truncate(2)
        f.pwrite(0, b"b")
    possible = {b"", b"aaaa", b"\0\0", b"b", b"aa", b"baaa", b"b\0", b"ba"}
    outcomes = {disk.crash(random.Random(s), keep_unsynced=True).read_file("f") for s in range(100)}
    assert outcomes == possible


def test_keep_unsynced_needs_rng() -> None:
    with pytest.raises(ValueError):
        SimDisk().crash(keep_unsynced=True)


def torn_outcomes(durable: bytes, offset: int, data: bytes, seeds: int = 400) -> set[bytes]:
    """What a power cut during one unsynced write can leave, over many seeds."""
    disk = SimDisk()
    durable_file(disk, "f", durable)
    write(disk, "f", offset, data)
    return {disk.crash(random.Random(seed), keep_unsynced=True, tear=True).read_file("f")
            for seed in range(seeds)}


def sectors(data: bytes) -> list[bytes]:
    return [data[i : i + 512] for i in range(0, len(data), 512)]


@pytest.mark.parametrize("length", [4096, 1000, 100])
def test_torn_write_keeps_whole_sectors(length: int) -> None:
    new = b"\xab" * length
    outcomes = torn_outcomes(b"", 0, new)
    for data in outcomes:
        assert len(data) <= length and (len(data) % 512 == 0 or len(data) == length)
        # Each sector holds all of its new bytes or none (zeros: the size landed, data not).
        assert all(sector in (new[i * 512 : i * 512 + len(sector)], bytes(len(sector)))
                   for i, sector in enumerate(sectors(data))), data
    assert {len(data) for data in outcomes} == {*range(0, length, 512), length}
    assert new in outcomes and bytes(length) in outcomes  # whole; the size alone
    if length > 1024:
        lost_in_middle = [d for d in outcomes if len(d) == length and d.startswith(new[:512])
                          and bytes(512) in sectors(d)[1:-1] and d.endswith(new[-512:])]
        assert lost_in_middle, "no torn write lost a sector in the middle"
        assert any(d.startswith(bytes(512)) and new[:512] in sectors(d) for d in outcomes), \
            "no torn write lost its first sector and kept a later one"


def test_torn_overwrite_keeps_old_sectors_at_file_sector_boundaries() -> None:
    old, new = b"." * 2000, b"N" * 1000
    outcomes = torn_outcomes(old, 100, new)
    pieces = [(100, 512), (512, 1024), (1024, 1100)]  # sectors of the file, not of the write
    seen = set()
    for data in outcomes:
        assert len(data) == 2000 and data[:100] == old[:100] and data[1100:] == old[1100:]
        landed = tuple(data[a:b] == new[a - 100 : b - 100] for a, b in pieces)
        assert all(data[a:b] in (old[a:b], new[a - 100 : b - 100]) for a, b in pieces), data
        seen.add(landed)
    assert len(seen) == 8  # every subset of the three sectors


def test_tear_only_cuts_the_last_applied_write() -> None:
    disk = SimDisk()
    durable_file(disk, "f")
    with disk.open("f") as f:
        f.pwrite(0, b"a" * 1024)
        f.pwrite(1024, b"b" * 1024)
    outcomes = {
        disk.crash(random.Random(s), keep_unsynced=True, tear=True).read_file("f")
        for s in range(400)
    }
    for data in outcomes:
        if data[1024:].strip(b"\0"):  # the second write landed (in part): the first is whole
            assert data[:1024] in (b"a" * 1024, bytes(1024)), data
    assert b"a" * 512 in outcomes  # the first write torn (second one not applied)
    assert b"a" * 1024 + b"b" * 512 in outcomes
    assert b"a" * 1024 + bytes(512) + b"b" * 512 in outcomes  # a middle sector of the second


# -- crash with keep_unsynced: which directory changes may land ----------------------------------


def entry_outcomes(disk: SimDisk, seeds: int = 300) -> set[tuple]:
    return {tuple(sorted(tree(disk.crash(random.Random(seed), keep_unsynced=True)).items()))
            for seed in range(seeds)}


def test_rename_in_one_directory_lands_whole_or_not_at_all() -> None:
    disk = SimDisk()
    durable_file(disk, "a", b"A")
    durable_file(disk, "b", b"B")
    disk.rename("a", "b")
    assert entry_outcomes(disk) == {(("a", b"A"), ("b", b"B")), (("b", b"A"),)}


def test_changes_to_one_name_land_in_order() -> None:
    """create a, rename a -> b, create a again: never the third change without the second."""
    disk = SimDisk()
    with disk.open("a", create=True) as f:
        f.pwrite(0, b"1")
        f.fsync()
    disk.rename("a", "b")
    with disk.open("a", create=True) as f:
        f.pwrite(0, b"2")
        f.fsync()
    assert entry_outcomes(disk) == {(), (("a", b"1"),), (("b", b"1"),),
                                    (("a", b"2"), ("b", b"1"))}


def test_changes_to_different_names_land_independently() -> None:
    disk = SimDisk()
    for name in ("p", "q"):
        with disk.open(name, create=True) as f:
            f.pwrite(0, name.encode())
            f.fsync()
    # not only prefixes of the order they were made in: q may land without p
    assert entry_outcomes(disk) == {(), (("p", b"p"),), (("q", b"q"),),
                                    (("p", b"p"), ("q", b"q"))}


def test_a_new_name_may_land_without_its_data() -> None:
    disk = SimDisk()
    with disk.open("f", create=True) as f:
        f.pwrite(0, b"data")
    outcomes = entry_outcomes(disk)
    assert outcomes == {(), (("f", b""),), (("f", b"data"),)}
    disk.fsync_dir("")  # the name is durable now, its data still not
    assert {dict(o)["f"] for o in entry_outcomes(disk)} == {b"", b"data"}
    assert tree(disk.crash()) == {"f": b""}


def test_move_between_directories_lands_in_each_independently() -> None:
    disk = SimDisk()
    disk.mkdir("x")
    disk.mkdir("y")
    disk.fsync_dir("")
    durable_file(disk, "x/f", b"F")
    disk.rename("x/f", "y/f")
    files = {tuple(k for k, v in o if v is not None) for o in entry_outcomes(disk)}
    assert files == {("x/f",), ("y/f",), ("x/f", "y/f"), ()}


# -- fault injection and ENOSPC ------------------------------------------------------------------


def test_fail_next_raises_count_times_and_does_nothing() -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"old")
    f = disk.open("f")
    disk.fail_next("pwrite", errno.EIO, count=2)
    for _ in range(2):
        with pytest.raises(OSError) as info:
            f.pwrite(0, b"new")
        assert info.value.errno == errno.EIO
        assert disk.read_file("f") == b"old"
    f.pwrite(0, b"new")
    assert disk.read_file("f") == b"new"
    assert disk.counters.bytes_written == 6  # failed writes wrote nothing


@pytest.mark.parametrize(
    "op, call",
    [
        ("open", lambda d: d.open("f")),
        ("truncate", lambda d: d.open("f").truncate(0)),
        ("fsync", lambda d: d.open("f").fsync()),
        ("fsync_dir", lambda d: d.fsync_dir("")),
        ("rename", lambda d: d.rename("f", "g")),
        ("unlink", lambda d: d.unlink("f")),
        ("mkdir", lambda d: d.mkdir("d")),
    ],
)
def test_fail_next_each_op(op: str, call) -> None:
    disk = SimDisk()
    durable_file(disk, "f", b"old")
    write(disk, "f", 0, b"new")
    disk.fail_next(op, errno.ENOSPC)
    with pytest.raises(OSError) as info:
        call(disk)
    assert info.value.errno == errno.ENOSPC
    assert tree(disk) == {"f": b"new"}
    assert tree(disk.crash()) == {"f": b"old"}
    call(disk)  # the fault is used up


def test_fail_next_path_contains() -> None:
    disk = SimDisk()
    disk.mkdir("wal")
    disk.fail_next("open", errno.EACCES, count=1, path_contains="wal/")
    with disk.open("meta", create=True):
        pass
    with pytest.raises(PermissionError):
        disk.open("wal/1", create=True)
    assert not disk.exists("wal/1")
    with disk.open("wal/1", create=True):
        pass


def test_fail_next_unknown_op() -> None:
    with pytest.raises(ValueError):
        SimDisk().fail_next("fsink", errno.EIO)


def test_enospc_leaves_contents_unchanged() -> None:
    disk = SimDisk(capacity=1000)
    durable_file(disk, "a", b"x" * 600)
    with disk.open("b", create=True) as f:
        f.pwrite(0, b"y" * 300)
        assert disk.space().available == 100
        for action in (lambda: f.pwrite(300, b"z" * 101), lambda: f.truncate(401)):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.ENOSPC
        assert f.pread(0, 1000) == b"y" * 300
        f.pwrite(0, b"w" * 400)  # exactly fills the disk; overwriting needs no new space
        assert disk.space() == SpaceInfo(total=1000, available=0)
        f.truncate(100)
    assert disk.space().available == 300
    assert tree(disk.crash(random.Random(0), keep_unsynced=True))["a"] == b"x" * 600


# -- write_file_atomically: old or new, whenever the power goes ----------------------------------


@pytest.mark.parametrize(
    "step", ["open", "truncate", "pwrite", "fsync", "rename", "fsync_dir", None]
)
def test_write_file_atomically_old_or_new(step: str | None) -> None:
    disk = SimDisk()
    disk.mkdir("meta")
    disk.fsync_dir("")
    disk.write_file_atomically("meta/state", b"old state")
    if step is not None:
        # Power is lost right before ``step``: make it fail and crash afterwards.
        disk.fail_next(step, errno.EIO)
        with pytest.raises(OSError):
            disk.write_file_atomically("meta/state", b"new, longer state")
    else:
        disk.write_file_atomically("meta/state", b"new, longer state")
    expected = {b"old state"} if step is not None else {b"new, longer state"}
    assert disk.crash().read_file("meta/state") in expected
    outcomes = {
        disk.crash(random.Random(seed), keep_unsynced=True, tear=True).read_file("meta/state")
        for seed in range(50)
    }
    assert outcomes <= {b"old state", b"new, longer state"}
    if step in ("fsync_dir", None):
        # Renamed but not synced: either name may win, and the new file is complete either way.
        assert b"new, longer state" in outcomes


def test_rename_without_fsync_dir_gives_old_content() -> None:
    disk = SimDisk()
    disk.write_file_atomically("state", b"old")
    with disk.open("state.tmp", create=True) as f:
        f.truncate(0)
        f.pwrite(0, b"new")
        f.fsync()
    disk.rename("state.tmp", "state")
    assert disk.crash().read_file("state") == b"old"
    disk.fsync_dir("")
    assert disk.crash().read_file("state") == b"new"
