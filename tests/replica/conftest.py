"""A real S3 server (Swift + s3api) for the whole session, a fresh bucket per test, and the
helpers the replica tests share. Under CI a server that does not start fails the tests."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from tests.fuse.conftest import FUSE_USABLE
from tests.replica.s3server import SwiftS3, swift_installed


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must run the replica tests, a skip would hide failures")
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    if not swift_installed():
        _unavailable("the replica tests need Swift (scripts/install.sh installs it)")
    server = SwiftS3(tmp_path_factory.mktemp("swift"))
    try:
        server.start()
    except RuntimeError as exc:
        _unavailable(f"the S3 server did not start: {exc}")
    saved = {name: os.environ.get(name) for name in server.environment()}
    os.environ.update(server.environment())  # the daemons and CLIs started by tests inherit it
    yield server
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def replica_url(s3_server) -> str:
    """s3://BUCKET/PREFIX of a new, empty bucket."""
    if not FUSE_USABLE:
        _unavailable("the replica tests need root, /dev/fuse and fusermount3")
    if not s3_server.running:
        s3_server.start()
    import boto3
    from botocore.config import Config

    bucket = f"razorfs-{secrets.token_hex(6)}"
    boto3.client("s3", config=Config(s3={"addressing_style": "path"})).create_bucket(
        Bucket=bucket)
    return f"s3://{bucket}/fs"


def stats(mount) -> dict:
    """What `razorfs stats --json` prints (asked in-process: a CLI run per step is slow)."""
    from razorfs.control import query

    return query(str(mount.data))


def wait_caught_up(mount, timeout: float = 30.0) -> dict:
    """Poll until the replica holds every durable change; return the stats then."""
    deadline = time.monotonic() + timeout
    while True:
        current = stats(mount)
        replica = current["replica"]
        if (replica["lag_lsns"] == 0 and not replica["needs_base"]
                and replica["shipped_lsn"] >= current["wal"]["durable_lsn"]):
            return current
        assert time.monotonic() < deadline, f"replica did not catch up: {replica}"
        time.sleep(0.05)


def sync_all(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def make_mount(tmp_path, replica_url):
    """Factory: ``make_mount(*options, data=None, fresh=True)`` → a razorfs mounted with
    ``--replica`` (of this test's bucket, unless options give one); cleaned up and checked
    (clean log, clean fsck) at teardown like tests/fuse's mounts."""
    from tests.fuse.conftest import Mount

    mounts: list[Mount] = []

    def factory(*options: str, data: Path | None = None, fresh: bool = True,
                replica: bool = True) -> Mount:
        root = tmp_path / f"fs{len(mounts)}"
        extra = ("--replica", replica_url) if replica and "--replica" not in options else ()
        mount = Mount(root, *options, *extra, data=data)
        mounts.append(mount)
        if fresh:
            mount.mkfs()
        mount.path.mkdir(parents=True, exist_ok=True)
        return mount.mount()

    yield factory
    errors = []
    for mount in reversed(mounts):
        try:
            mount.cleanup()
        except Exception as exc:
            errors.append(exc)
    for mount in mounts:
        mount.check_after()
    if errors:
        raise errors[0]


def s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(s3={"addressing_style": "path"}))


def object_names(url: str) -> list[str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    found = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                       Prefix=prefix + "/"):
        found += [item["Key"][len(prefix) + 1:] for item in page.get("Contents", ())]
    return sorted(found)


def chunk_spans(url: str) -> list[tuple[int, int]]:
    from razorfs.storage import replica_formats as rf

    return sorted(span for name in object_names(url) if name.startswith("chunks/")
                  if (span := rf.parse_chunk_key(name.split("/", 1)[1])) is not None)
