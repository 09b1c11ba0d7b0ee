"""G5 on real mounts: flipped bytes in a data directory (after a clean unmount or a kill -9).

The contract: razorfs either refuses to mount with one clear line naming the damaged file and
offset (exit status 2, no traceback, nothing left mounted, nothing changed on disk), or serves
the original bytes, or answers EIO for the damaged data — never wrong bytes, never a traceback,
never a dead mount. ``razorfs fsck`` reports the same damage (exit 1, or 2 for a bad superblock).

Each data directory is built once per module (``images``) and copied for every test case.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest

from razorfs.datadir import holder_pid
from razorfs.storage import formats
from razorfs.storage.formats import BLOCK_SIZE
from tests.fuse.conftest import BAD_EVENTS, FUSE_USABLE, Mount, mounted_at, razorfs

pytestmark = [
    pytest.mark.skipif(not FUSE_USABLE and not os.environ.get("CI"),
                       reason="real FUSE tests need root, /dev/fuse and fusermount3"),
    pytest.mark.timeout(240),
]

FILES = 5  # fsync'd one after the other: one group commit each
OPTIONS = ("--commit-interval", "600")  # no commit timer: commits happen only at fsync
VICTIM = [random.Random(f"block{i}").randbytes(BLOCK_SIZE) for i in range(8)]


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def populate(mount: Mount, count: int, prefix: str = "f") -> dict[str, bytes]:
    """``count`` files written and fsync'd one after the other: one group commit each."""
    files = {f"{prefix}{i}": random.Random(f"{prefix}{i}").randbytes(3000 + 5000 * i)
             for i in range(count)}
    for name, data in files.items():
        write_synced(mount.path / name, data)
    return files


def contents(mount: Mount) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(mount.path.iterdir())}


def crashed(mount: Mount, commits: int = FILES) -> dict:
    """``commits`` fsync'd files, then kill -9: the WAL holds them all, in as many batches."""
    files = populate(mount, commits)
    mount.kill9()
    return {"files": files}


def two_checkpoints(mount: Mount) -> dict:
    populate(mount, 3, prefix="a")
    mount.remount()
    populate(mount, 3, prefix="b")
    os.unlink(mount.path / "a1")
    (mount.path / "a2").write_bytes(b"rewritten in the second cycle")
    files = contents(mount)
    mount.unmount()
    return {"files": files}


def victim(mount: Mount, crash: bool) -> dict:
    """Two files, then one of 8 distinct blocks (the last ones of the block store), then a clean
    unmount or a kill -9."""
    others = populate(mount, 2, prefix="other")
    write_synced(mount.path / "victim", b"".join(VICTIM))
    ino = os.stat(mount.path / "victim").st_ino
    if crash:
        mount.kill9()
    else:
        mount.unmount()
    return {"ino": ino, "others": others}


BUILDERS = {
    "crashed": crashed,
    "crashed after one commit": lambda mount: crashed(mount, 1),
    "two checkpoints": two_checkpoints,
    "victim, unmounted": lambda mount: victim(mount, crash=False),
    "victim, crashed": lambda mount: victim(mount, crash=True),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """``images(name)`` → (data directory, facts) of a filesystem built once by BUILDERS[name]
    (from a fresh mount) and left unmounted."""
    built: dict[str, tuple[Path, dict]] = {}

    def image(name: str) -> tuple[Path, dict]:
        if name not in built:
            mount = Mount(tmp_path_factory.mktemp("image"), *OPTIONS).mkfs().mount()
            try:
                built[name] = mount.data, BUILDERS[name](mount)
            finally:
                mount.cleanup()
        return built[name]

    return image


@pytest.fixture
def copy_of(images, tmp_path):
    """``copy_of(name)`` → (unmounted Mount of a private copy of that image, facts). Teardown
    unmounts it and checks the daemon log for G6 events (fsck is each test's business)."""
    made: list[Mount] = []

    def factory(name: str) -> tuple[Mount, dict]:
        data, facts = images(name)
        shutil.copytree(data, tmp_path / "data")
        (tmp_path / "mnt").mkdir()
        made.append(Mount(tmp_path, *OPTIONS))
        return made[-1], facts

    yield factory
    for mount in made:
        mount.cleanup()
        bad = [e for e in mount.events(since=0) if str(e.get("event", "")).startswith(BAD_EVENTS)]
        assert not bad, f"daemon log has error events: {bad}"


def flip(path: Path, offset: int, mask: int = 0x40) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        assert byte, f"{path} has no byte at offset {offset}"
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ mask]))


def wal_records(data: Path) -> list[tuple[Path, formats.Record]]:
    """Every valid record of every segment, in log order."""
    found = []
    for segment in sorted((data / "wal").glob("*.wal")):
        blob = segment.read_bytes()
        offset = formats.SEGMENT_HEADER_SIZE
        while (record := formats.decode_record(blob, offset)) is not None:
            found.append((segment, record))
            offset = record.end
    return found


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in ("razorfs.log", "lock"):
            digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def refused(mount: Mount) -> str:
    """Mount must fail with exit status 2 and one line on stderr, leave nothing mounted and
    change nothing in the data directory; return that line."""
    before = tree_digest(mount.data)
    log_start = mount.log.stat().st_size
    result = razorfs("mount", mount.data, mount.path)
    assert result.returncode == 2, f"mount of a damaged data directory: {result}"
    with open(mount.log, "rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read() + (result.stdout + result.stderr).encode()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    assert not mounted_at(mount.path)
    assert tree_digest(mount.data) == before, "a refused mount changed the data directory"
    assert holder_pid(str(mount.data)) is None, "a daemon still holds the data directory"
    return lines[0]


def fsck(mount: Mount, status: int, *extra: str) -> str:
    result = mount.fsck(*extra)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == status, f"fsck: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr


# ---- WAL ----

RECORD_FIELDS = {"magic": 1, "length": 5, "lsn": 9, "batch": 17, "crc": 25, "following": 29}


def pick_record(data: Path, batch: int, position: int) -> tuple[Path, formats.Record]:
    """Record ``position`` of group commit ``batch`` (negative: counted from the last one)."""
    records = wal_records(data)
    batches = sorted({r.batch for _, r in records})
    assert len(batches) >= FILES, f"expected a group commit per fsync, got batches {batches}"
    wanted = batches[batch if batch < 0 else batch - 1]
    return [r for r in records if r[1].batch == wanted][position]


def damage_record(segment: Path, record: formats.Record, field: str) -> None:
    flip(segment, record.offset + RECORD_FIELDS.get(
        field, formats.RECORD_HEADER_SIZE + len(record.payload) // 2))  # else: the payload


@pytest.mark.parametrize("batch, position, field", [
    (1, 0, "magic"), (1, -1, "payload"), (3, -1, "lsn"), (-2, 0, "length"),
    (-2, -1, "crc"), (-2, -1, "following"),  # the last record of a batch, one batch follows
])
def test_wal_damage_followed_by_later_commits_refuses_mount(copy_of, batch, position, field):
    fs, _ = copy_of("crashed")
    segment, record = pick_record(fs.data, batch, position)
    damage_record(segment, record, field)
    name = f"wal/{segment.name}"

    line = refused(fs)
    assert "corrupt" in line and f"{name} offset {record.offset}" in line, line
    report = fsck(fs, 1)
    assert "corrupt" in report and f"{name} offset {record.offset}" in report, report


@pytest.mark.parametrize("position, field", [(-1, "following"), (-1, "payload"), (0, "lsn")])
def test_wal_damaged_last_commit_is_a_torn_tail(copy_of, position, field):
    fs, facts = copy_of("crashed")
    segment, record = pick_record(fs.data, -1, position)
    damage_record(segment, record, field)

    assert "torn WAL tail" in fsck(fs, 0)
    fs.mount()
    cut = fs.event("cutting torn WAL tail")
    assert cut["segment"] == f"wal/{segment.name}" and cut["offset"] == record.offset
    *durable, (last_name, last_data) = facts["files"].items()
    found = contents(fs)
    for name, data in durable:
        assert found.pop(name) == data, f"{name}, fsync'd before the last commit, changed"
    # The last commit (create + write of the last file) is cut as a whole or from the record on.
    assert found.pop(last_name, None) in (None, b"", last_data)
    assert not found
    fs.unmount()
    fsck(fs, 0)


@pytest.mark.parametrize("image", ["crashed after one commit", "crashed"])
def test_wal_segment_header_damage_before_valid_records_refuses_mount(copy_of, image):
    fs, _ = copy_of(image)
    segment = wal_records(fs.data)[0][0]
    flip(segment, 20)  # the header's first LSN

    line = refused(fs)
    assert f"wal/{segment.name}" in line and "header" in line, line
    assert f"wal/{segment.name}" in fsck(fs, 1)


def stamp_version(path: Path, version: int, crc_at: int) -> None:
    """Set the format version (bytes 8..11) of a superblock, segment or checkpoint header and
    recompute its header CRC (of bytes 0..crc_at-1, stored at crc_at)."""
    blob = bytearray(path.read_bytes())
    blob[8:12] = struct.pack("<I", version)
    blob[crc_at : crc_at + 4] = struct.pack("<I", formats.crc(bytes(blob[:crc_at])))
    path.write_bytes(bytes(blob))


def rewrite_as_first_layout(data: Path) -> None:
    """Turn a data directory into what razorfs wrote until commit 96ad915 under format version 1:
    WAL record bytes 28..31 reserved zero, the CRC over bytes 4..23 and the payload only."""
    for segment, record in wal_records(data):
        fields = struct.pack("<IQQ", len(record.payload), record.lsn, record.batch)
        with open(segment, "r+b") as stream:
            stream.seek(record.offset + 24)
            stream.write(struct.pack("<II", formats.crc(record.payload, formats.crc(fields)), 0))
    stamp_version(data / formats.SUPERBLOCK_PATH, 1, formats.SUPERBLOCK_SIZE - 4)
    for segment in (data / "wal").glob("*.wal"):
        stamp_version(segment, 1, formats.SEGMENT_HEADER_SIZE - 4)
    for checkpoint in (data / "checkpoints").glob("*.ckpt"):
        stamp_version(checkpoint, 1, formats.CHECKPOINT_HEADER_SIZE - 4)


def test_wal_of_the_first_record_layout_is_replayed_or_refused(copy_of):
    """A crash under the previous razorfs, then an upgrade: its log is replayed, or the mount is
    refused for its format version; never read as a torn tail and dropped."""
    fs, facts = copy_of("crashed")
    rewrite_as_first_layout(fs.data)
    result = razorfs("mount", fs.data, fs.path)
    if result.returncode == 2:
        assert "version" in result.stderr and not mounted_at(fs.path), result.stderr
        return
    assert result.returncode == 0, result
    fs.pid = int(re.search(r"daemon pid (\d+)", result.stdout).group(1))
    found = contents(fs)
    assert found.keys() == facts["files"].keys(), f"fsync'd files lost: {found.keys()}"
    assert found == facts["files"]


# ---- checkpoints ----

def checkpoints(mount: Mount) -> list[Path]:
    return sorted((mount.data / "checkpoints").glob("*.ckpt"))


def damage_checkpoint(path: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size - 7)
    else:
        flip(path, {"header": 16, "body": formats.CHECKPOINT_HEADER_SIZE + 5}[how])


@pytest.mark.parametrize("how", ["header", "body"])
def test_damaged_newest_checkpoint_falls_back_to_the_older_one(copy_of, how):
    fs, facts = copy_of("two checkpoints")
    older, newest = checkpoints(fs)
    assert older.name != "0000000000000000.ckpt", "the second cycle made no new checkpoint"
    damage_checkpoint(newest, how)

    report = fsck(fs, 1)
    assert "damaged checkpoint" in report and f"checkpoints/{newest.name}" in report, report
    fs.mount()
    warning = fs.event("skipped damaged checkpoint, used an older one")
    assert f"checkpoints/{newest.name}" in warning["reason"]
    assert contents(fs) == facts["files"]
    fs.unmount()
    assert newest.with_name(newest.name + ".damaged").exists()
    fsck(fs, 0)


@pytest.mark.parametrize("how", ["body", "truncated"])
def test_damaged_only_checkpoint_refuses_mount(copy_of, how):
    fs, _ = copy_of("crashed")
    (only,) = checkpoints(fs)
    damage_checkpoint(only, how)

    line = refused(fs)
    assert f"checkpoints/{only.name}" in line, line
    assert f"checkpoints/{only.name}" in fsck(fs, 1)


# ---- superblock ----

@pytest.mark.parametrize("damage", ["version", "uuid", "magic", "truncated"])
def test_damaged_superblock_refuses_mount(copy_of, damage):
    fs, _ = copy_of("two checkpoints")
    superblock = fs.data / formats.SUPERBLOCK_PATH
    if damage == "truncated":
        os.truncate(superblock, 40)
    else:
        flip(superblock, {"magic": 2, "version": 8, "uuid": 20}[damage])

    line = refused(fs)
    expected = "not a razorfs superblock" if damage in ("magic", "truncated") else "checksum"
    assert "superblock" in line and expected in line, line
    assert "superblock" in fsck(fs, 2)


# ---- data blocks ----

@pytest.mark.parametrize("image, block, damage", [
    ("victim, unmounted", 0, 0), ("victim, crashed", 5, 4095), ("victim, unmounted", 7, None)])
def test_damaged_data_block_reads_as_eio(copy_of, image, block, damage):
    """``damage``: the byte of the block to flip, or None to cut the block store inside it."""
    fs, facts = copy_of(image)
    ino, blocks = facts["ino"], list(VICTIM)
    store = fs.data / formats.BLOCKS_PATH
    raw = store.read_bytes()
    pblk = next(p for p in range(len(raw) // BLOCK_SIZE)
                if raw[p * BLOCK_SIZE : (p + 1) * BLOCK_SIZE] == blocks[block])
    if damage is None:
        assert (pblk + 1) * BLOCK_SIZE == len(raw), "the block is not the store's last one"
        os.truncate(store, pblk * BLOCK_SIZE + 100)
        problem, event = f"block {pblk} is beyond the block store's end", "block store read failed"
    else:
        flip(store, pblk * BLOCK_SIZE + damage)
        problem, event = f"data block {pblk} checksum mismatch", "data block checksum mismatch"

    report = fsck(fs, 1)
    assert f"inode {ino} (/victim) offset {block * BLOCK_SIZE}: {problem}" in report, report
    if damage is None:  # a structural problem, found without reading data
        assert problem in fsck(fs, 1, "--quick")
    else:  # --quick skips data checksums
        fsck(fs, 0, "--quick")

    fs.mount()
    victim = fs.path / "victim"
    fd = os.open(victim, os.O_RDWR)
    try:
        for i, data in enumerate(blocks):  # each block on its own, then a range across it
            if i == block:
                with pytest.raises(OSError) as caught:
                    os.pread(fd, BLOCK_SIZE, i * BLOCK_SIZE)
                assert caught.value.errno == errno.EIO
            else:
                assert os.pread(fd, BLOCK_SIZE, i * BLOCK_SIZE) == data, f"block {i}"
        with pytest.raises(OSError) as caught:
            victim.read_bytes()
        assert caught.value.errno == errno.EIO
        errors = [e for e in fs.events() if e.get("level") == "error"]
        assert errors and all(e["event"] == event and e["inode"] == ino and e.get(
            "offset", block * BLOCK_SIZE) == block * BLOCK_SIZE for e in errors), errors

        # The mount is alive: other files read back, new files can be written.
        for name, data in facts["others"].items():
            assert (fs.path / name).read_bytes() == data
        write_synced(fs.path / "after", b"still writable")
        # A partial write into the damaged block needs its old bytes: EIO, nothing changes;
        with pytest.raises(OSError) as caught:
            os.pwrite(fd, b"patch", block * BLOCK_SIZE + 100)
        assert caught.value.errno == errno.EIO
        with pytest.raises(OSError) as caught:  # so does a truncate to inside it
            os.ftruncate(fd, block * BLOCK_SIZE + 10)
        assert caught.value.errno == errno.EIO
        assert os.fstat(fd).st_size == len(blocks) * BLOCK_SIZE
        # A whole-block overwrite needs no old bytes: it replaces the damaged block.
        blocks[block] = b"healed!!" * (BLOCK_SIZE // 8)
        assert os.pwrite(fd, blocks[block], block * BLOCK_SIZE) == BLOCK_SIZE
        os.fsync(fd)
    finally:
        os.close(fd)
    fs.unmount()
    fsck(fs, 0)
    fs.mount()
    assert victim.read_bytes() == b"".join(blocks)
    assert (fs.path / "after").read_bytes() == b"still writable"
