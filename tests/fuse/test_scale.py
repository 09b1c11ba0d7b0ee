"""Many files, big sparse files, large writes, extreme sizes."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time

import pytest

MiB = 1 << 20


@pytest.mark.timeout(150)
def test_ten_thousand_files_in_one_directory(mount):
    d = mount.path / "many"
    os.mkdir(d)
    for i in range(10_000):
        fd = os.open(d / f"file-{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if i % 1000 == 0:
            os.write(fd, str(i).encode())
        os.close(fd)
    names = os.listdir(d)
    assert len(names) == len(set(names)) == 10_000
    for i in (0, 1, 4999, 7000, 9999):
        st = os.stat(d / f"file-{i:05d}")
        assert st.st_size == (len(str(i)) if i % 1000 == 0 else 0)
    assert (d / "file-07000").read_bytes() == b"7000"
    mount.remount()
    names_after = os.listdir(d)
    assert len(names_after) == 10_000 and set(names_after) == set(names)
    assert (d / "file-09000").read_bytes() == b"9000"
    assert os.stat(d).st_nlink == 2


@pytest.mark.timeout(60)
def test_one_gib_sparse_file(mount):
    path = mount.path / "sparse"
    with open(path, "wb") as stream:
        stream.truncate(1 << 30)
        stream.seek(512 * MiB)
        stream.write(b"needle")
    st = os.stat(path)
    assert st.st_size == 1 << 30
    assert st.st_blocks <= 16  # one 4 KiB block (8 sectors), not 1 GiB

    def check() -> None:
        with open(path, "rb") as stream:
            stream.seek(512 * MiB - 10)
            assert stream.read(26) == bytes(10) + b"needle" + bytes(10)
            stream.seek((1 << 30) - 4096)
            assert stream.read(8192) == bytes(4096)
            assert stream.read(1) == b""
            stream.seek(0)
            assert stream.read(MiB) == bytes(MiB)

    check()
    mount.remount()
    check()
    st = os.stat(path)
    assert st.st_size == 1 << 30 and st.st_blocks <= 16


@pytest.mark.timeout(120)
def test_64_mib_file_checksum(mount):
    seed = 20240613
    rng = random.Random(seed)
    path = mount.path / "big"
    written = hashlib.sha256()
    with open(path, "wb") as stream:
        for _ in range(64):
            chunk = rng.randbytes(MiB)
            written.update(chunk)
            stream.write(chunk)

    def read_digest() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            while chunk := stream.read(MiB):
                digest.update(chunk)
        return digest.hexdigest()

    assert os.stat(path).st_size == 64 * MiB
    assert read_digest() == written.hexdigest()
    mount.remount()  # cold page cache: the bytes come from the block store
    assert read_digest() == written.hexdigest()
    mount.unmount()
    assert mount.fsck().returncode == 0


@pytest.mark.timeout(60)
def test_truncate_to_absurd_size(mount):
    path = mount.path / "huge"
    path.write_bytes(b"")
    size = 999_999_999_999_999
    try:
        os.truncate(path, size)
    except OSError as exc:
        assert exc.errno == errno.EFBIG, exc
        assert os.stat(path).st_size == 0
        size = 0
    else:
        st = os.stat(path)
        assert st.st_size == size and st.st_blocks == 0
        with open(path, "rb") as stream:
            stream.seek(size - 100)
            assert stream.read(200) == bytes(100)
            stream.seek(0)
            assert stream.read(10) == bytes(10)
    # the mount is alive and still works
    (mount.path / "after").write_bytes(b"ok")
    assert (mount.path / "after").read_bytes() == b"ok"
    assert sorted(os.listdir(mount.path)) == ["after", "huge"]
    mount.remount()
    assert os.stat(path).st_size == size  # as the truncate left it, taken or refused


@pytest.mark.timeout(90)
def test_wal_segments_roll_over_checkpoint_and_trim(mount):
    """~160 MiB of log (64 KiB xattr values): segments roll over, checkpoints are taken while
    mounted and trim the log, and a crash afterwards replays across segments."""
    path = mount.path / "f"
    path.write_bytes(b"")
    filler = os.urandom(65536 - 8)

    def churn(rounds: int, start: int) -> None:
        for i in range(start, start + rounds):
            os.setxattr(path, "user.big", i.to_bytes(8, "little") + filler)

    def wait_for_checkpoints(count: int) -> None:
        deadline = time.monotonic() + 20
        while len([e for e in mount.events() if e.get("event") == "checkpoint"]) < count:
            assert time.monotonic() < deadline, "no checkpoint was taken while mounted"
            time.sleep(0.1)

    churn(1100, 0)
    wait_for_checkpoints(1)
    assert len(os.listdir(mount.data / "wal")) > 1  # the log rolled over to new segments
    churn(1100, 1100)
    wait_for_checkpoints(2)
    churn(300, 2200)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    mount.kill9()
    segments = sorted(os.listdir(mount.data / "wal"))
    assert "0000000000000001.wal" not in segments  # trimmed once covered by two checkpoints
    assert len(segments) < 160 // 16
    mount.mount()
    assert mount.event("recovered")["replayed"] >= 300
    assert os.getxattr(path, "user.big") == (2499).to_bytes(8, "little") + filler
