"""The replica against a real S3 server (Swift + s3api on 127.0.0.1, tests/replica/s3server.py).

Every test mounts razorfs with ``--replica``, drives it through the real mount, and restores
with the real CLI; trees are compared with a model of the workload (tests/replica/workload.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import threading
import time
import urllib.request


from razorfs.storage.checkpoints import read_epochs, read_superblock
from razorfs.storage.files import FileStorage
from tests.fuse.conftest import razorfs
from tests.replica.conftest import (
    chunk_spans, object_names, s3_client, stats, sync_all, wait_caught_up)
from tests.replica.workload import Workload, data_dir_tree, mounted_tree

SEED = int(os.environ.get("RAZORFS_SEED") or random.randrange(1 << 32))


def restore(url: str, target, *options) -> None:
    result = razorfs("restore", url, target, *options)
    assert result.returncode == 0, f"restore {options}: {result.stdout}{result.stderr}"


def restore_in_process(url: str, target, lsn: int) -> dict:
    """The tree ``razorfs restore --to-lsn`` builds, without a process start per restore."""
    from razorfs.restore import restore as restore_replica

    restore_replica(url, str(target), to_lsn=lsn, progress=lambda *_: None)
    tree = data_dir_tree(target)
    shutil.rmtree(target)
    return tree


def ranges(url: str) -> list[dict]:
    result = razorfs("replica", "ls", url, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_restore_after_losing_the_machine(make_mount, replica_url, tmp_path):
    """write + fsync → the replica catches up → kill -9 and the data directory deleted →
    restore → the same tree, which mounts and passes fsck; lag is 0 in stats and metrics."""
    port = _free_port()
    mount = make_mount("--metrics", f"127.0.0.1:{port}")
    work = Workload(mount.path, SEED)
    for _ in range(60):
        work.step()
    big = os.urandom(3 << 20)
    (mount.path / "big").write_bytes(big)
    work.model["big"] = ("f", 0o644, big)
    sync_all(mount.path)
    caught_up = wait_caught_up(mount)
    replica = caught_up["replica"]
    assert {key for key in replica if "lag" in key} >= {"lag_lsns", "lag_bytes", "lag_seconds"}
    assert all(replica[key] == 0 for key in replica if "lag" in key), replica
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert "razorfs_replica_lag_lsns 0.0" in metrics and "razorfs_replica_lag_seconds" in metrics
    assert mounted_tree(mount.path) == work.model
    mount.kill9()
    shutil.rmtree(mount.data)

    restore(replica_url, mount.data)
    assert data_dir_tree(mount.data) == work.model
    assert razorfs("fsck", mount.data).returncode == 0
    # File handles made before answer ESTALE, never reach a file that gets a number again.
    epochs = read_epochs(FileStorage(str(mount.data)), read_superblock(
        FileStorage(str(mount.data))).uuid)
    assert len(epochs) == 1 and epochs[0][1] > time.time() - 3600, epochs
    mount.mount()
    assert mounted_tree(mount.path) == work.model


def test_point_in_time_restores_match_the_model(make_mount, replica_url, tmp_path):
    """A seeded workload; after each step its LSN and the model; restores at many of those
    LSNs (and one time) each equal the model of that step."""
    mount = make_mount()
    wait_caught_up(mount)  # moments are restorable from the first base on
    work = Workload(mount.path, SEED)
    moments = []
    for step in range(40):
        work.step()
        if step % 3 == 0:
            sync_all(mount.path)
        moments.append((stats(mount)["wal"]["last_lsn"], time.time_ns(), work.snapshot()))
        if step == 24:
            time.sleep(0.5)  # a quiet moment after a durable step, for --to-time below
    sync_all(mount.path)
    wait_caught_up(mount)
    chosen = random.Random(SEED).sample(moments, 8) + [moments[-1]]
    for lsn, _, model in chosen:
        assert restore_in_process(replica_url, tmp_path / "at", lsn) == model, (
            f"seed {SEED}: restore to LSN {lsn} differs")
    # --to-time: the newest state durable at that moment, in the quiet time after step 24
    moment = moments[24][1] + 250_000_000
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(moment / 1e9)) + \
        f".{moment % 1_000_000_000 // 1000:06d}"
    restore(replica_url, tmp_path / "by-time", "--to-time", when)
    assert data_dir_tree(tmp_path / "by-time") == moments[24][2]
    assert ranges(replica_url)[-1]["to_lsn"] == stats(mount)["replica"]["shipped_lsn"]


def test_store_down_then_back_loses_and_skips_nothing(make_mount, replica_url, s3_server,
                                                      tmp_path):
    """The server stopped mid-stream: the mount keeps working (fsync stays local), the replica
    reports the store unreachable and lag > 0. Meanwhile blocks are born, freed and their space
    asked for again, and two clean remounts checkpoint and trim the log and rebuild the free
    map from the tree. Restarted: lag back to 0, one gap-free range, and restores to LSNs from
    the outage equal the model of then."""
    mount = make_mount()
    work = Workload(mount.path, SEED)
    for _ in range(15):
        work.step()
    sync_all(mount.path)
    wait_caught_up(mount)
    s3_server.stop()
    outage = []
    try:
        for round_number in range(3):
            for name in ("big", "big", "other"):  # born, freed, then space asked for again
                data = os.urandom(2 << 20)
                (mount.path / name).write_bytes(data)
                work.model[name] = ("f", 0o644, data)
                for _ in range(5):
                    work.step()
                started = time.monotonic()
                sync_all(mount.path)
                assert time.monotonic() - started < 5, "fsync waited for the object store"
                outage.append((stats(mount)["wal"]["last_lsn"], work.snapshot()))
            if round_number == 0:
                deadline = time.monotonic() + 20
                while not (current := stats(mount)["replica"])["store_error"]:
                    assert time.monotonic() < deadline, f"store error never reported: {current}"
                    time.sleep(0.1)
                assert current["lag_lsns"] > 0 and current["lag_bytes"] > 0, current
                assert any(event.get("event", "").startswith("replica: store unreachable")
                           for event in mount.events())
            if round_number < 2:
                mount.remount()
    finally:
        s3_server.start()
    wait_caught_up(mount, timeout=90)
    spans = ranges(replica_url)
    assert len(spans) == 1, f"the outage left a gap: {spans}"
    assert not stats(mount)["replica"]["needs_base"]
    for lsn, model in outage[::2]:
        assert restore_in_process(replica_url, tmp_path / "outage", lsn) == model


class ThrottlingProxy:
    """A TCP relay to the S3 server that passes ``rate`` bytes per second each way: uploads
    take long enough to be killed in the middle of."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.rate = rate
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uploaded = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for source, sink, upload in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, upload),
                                 daemon=True).start()

    def _pump(self, source, sink, upload: bool) -> None:
        try:
            while data := source.recv(16384):
                if upload:
                    self.uploaded += len(data)
                sink.sendall(data)
                time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_kill9_mid_upload_resumes_without_duplicates_or_loss(make_mount, replica_url,
                                                            s3_server, tmp_path, monkeypatch):
    """Uploads slowed to 2 MB/s; the daemon is SIGKILLed while a chunk is on the wire, twice.
    The next mount resumes: every LSN is in exactly one chunk, the chain has no gap, and the
    newest restore equals the tree."""
    proxy = ThrottlingProxy(s3_server.ports["proxy"], 2 << 20)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    try:
        mount = make_mount()
        work = Workload(mount.path, SEED)
        for round_number in range(2):
            for _ in range(10):
                work.step()
            payload = os.urandom(6 << 20)
            (mount.path / f"payload{round_number}").write_bytes(payload)
            work.model[f"payload{round_number}"] = ("f", 0o644, payload)
            sync_all(mount.path)
            before = proxy.uploaded
            deadline = time.monotonic() + 20
            while proxy.uploaded < before + (1 << 20):  # a chunk is going out
                assert time.monotonic() < deadline, "no upload started"
                time.sleep(0.02)
            mount.kill9()
            mount.mount()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        mount.remount()
        sync_all(mount.path)
        wait_caught_up(mount, timeout=60)
    finally:
        proxy.close()
    spans = chunk_spans(replica_url)
    covered = [lsn for first, last in spans for lsn in range(first, last + 1)]
    assert len(covered) == len(set(covered)), f"an LSN is in two chunks: {spans}"
    assert len(ranges(replica_url)) == 1, ranges(replica_url)
    target = tmp_path / "restored"
    restore(replica_url, target)
    assert data_dir_tree(target) == work.model == mounted_tree(mount.path)


def test_damaged_or_missing_object_refuses_the_restore(make_mount, replica_url, tmp_path):
    mount = make_mount()
    work = Workload(mount.path, SEED)
    for _ in range(20):
        work.step()
    sync_all(mount.path)
    wait_caught_up(mount)  # the base
    (mount.path / "data").write_bytes(os.urandom(200_000))
    sync_all(mount.path)
    wait_caught_up(mount)  # and a chunk after it
    bucket, _, prefix = replica_url[len("s3://"):].partition("/")
    client = s3_client()
    names = object_names(replica_url)
    chunk = next(name for name in reversed(names) if name.startswith("chunks/"))
    original = client.get_object(Bucket=bucket, Key=f"{prefix}/{chunk}")["Body"].read()
    damaged = bytearray(original)
    damaged[len(damaged) - 100] ^= 0x01  # inside a data block
    client.put_object(Bucket=bucket, Key=f"{prefix}/{chunk}", Body=bytes(damaged))
    result = razorfs("restore", replica_url, tmp_path / "r1")
    assert result.returncode == 2 and chunk in result.stderr, result.stderr
    assert not (tmp_path / "r1").exists(), "a half-made restore was left behind"

    client.put_object(Bucket=bucket, Key=f"{prefix}/{chunk}", Body=original)
    pack = next(name for name in names if "/pack-" in name)
    client.delete_object(Bucket=bucket, Key=f"{prefix}/{pack}")
    result = razorfs("restore", replica_url, tmp_path / "r2")
    assert result.returncode == 2 and pack in result.stderr and "missing" in result.stderr, (
        result.stderr)
    assert not (tmp_path / "r2").exists()


def test_retention_prunes_yet_every_moment_in_the_window_restores(make_mount, replica_url,
                                                                  tmp_path):
    """--replica-retention 4s, with a base whenever the chunks since the newest one outgrow
    it: old bases and chunks are deleted, the oldest moment of the window still restores."""
    retention = 4.0
    mount = make_mount("--replica-retention", "4s", "--replica-base-bytes", "1")
    work = Workload(mount.path, SEED)
    moments = []
    finish = time.monotonic() + 3 * retention
    while time.monotonic() < finish:
        for _ in range(3):
            work.step()
        sync_all(mount.path)
        moments.append((stats(mount)["wal"]["last_lsn"], time.time_ns(), work.snapshot()))
        time.sleep(0.3)
    wait_caught_up(mount)
    deadline = time.monotonic() + 20
    while stats(mount)["replica"]["objects_pruned"] == 0:
        assert time.monotonic() < deadline, "nothing was pruned"
        time.sleep(0.2)
    mount.unmount()  # no prune moves the window while the restores below run
    window_start = time.time_ns() - int(retention * 1e9)
    listed = ranges(replica_url)
    assert listed[0]["from_lsn"] > moments[0][0], f"nothing old was pruned: {listed}"
    inside = [moment for moment in moments if moment[1] >= window_start + 500_000_000]
    assert inside, "the workload left no moment inside the window"
    for lsn, _, model in (inside[0], inside[len(inside) // 2]):
        assert restore_in_process(replica_url, tmp_path / "kept", lsn) == model
    result = razorfs("restore", replica_url, tmp_path / "too-old", "--to-lsn", moments[0][0])
    assert result.returncode == 2 and "not restorable" in result.stderr, result.stderr


def test_backlog_past_its_bound_marks_a_gap_never_skips_silently(make_mount, replica_url,
                                                                 s3_server, tmp_path):
    """With the store down and more unshipped log than the bound, the local hold is released
    with an error logged; back up, the replica takes a fresh base and `replica ls` shows the
    gap; a restore into the gap refuses."""
    mount = make_mount("--replica-backlog-bytes", "20000")
    work = Workload(mount.path, SEED)
    for _ in range(5):
        work.step()
    sync_all(mount.path)
    before = wait_caught_up(mount)["replica"]["shipped_lsn"]
    s3_server.stop()
    try:
        for _ in range(150):
            work.step()
        sync_all(mount.path)
        gap_lsn = stats(mount)["wal"]["last_lsn"]
        deadline = time.monotonic() + 10
        while not stats(mount)["replica"]["needs_base"]:
            assert time.monotonic() < deadline, "the bound was not enforced"
            time.sleep(0.1)
        assert any("backlog over its bound" in event.get("event", "")
                   for event in mount.events())
    finally:
        s3_server.start()
    for _ in range(3):
        work.step()
    sync_all(mount.path)
    wait_caught_up(mount, timeout=90)
    spans = ranges(replica_url)
    assert len(spans) == 2 and spans[0]["to_lsn"] == before and spans[1]["from_lsn"] >= gap_lsn
    result = razorfs("restore", replica_url, tmp_path / "gap", "--to-lsn", before + 1)
    assert result.returncode == 2 and "not restorable" in result.stderr
    restore(replica_url, tmp_path / "newest")
    assert data_dir_tree(tmp_path / "newest") == work.model


def test_a_prefix_of_another_filesystem_is_refused_and_the_mount_works(make_mount,
                                                                       replica_url):
    first = make_mount()
    (first.path / "a").write_bytes(b"one")
    sync_all(first.path)
    wait_caught_up(first)
    second = make_mount()
    (second.path / "b").write_bytes(b"two")
    sync_all(second.path)
    deadline = time.monotonic() + 20
    while not stats(second)["replica"]["refused"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "another filesystem" in stats(second)["replica"]["refused"]
    assert (second.path / "b").read_bytes() == b"two"


def test_chunks_uploaded_but_not_recorded_are_adopted_not_sent_again(make_mount, replica_url,
                                                                      tmp_path):
    """A kill -9 between a chunk's upload and the write of replica.state: the record is older
    than the store. Simulated exactly by putting back the record of an earlier moment; the next
    mount takes the chunks already there as shipped instead of sending their LSNs again."""
    from razorfs.storage import replica_formats as rf

    mount = make_mount()
    work = Workload(mount.path, SEED)
    wait_caught_up(mount)
    old_record = (mount.data / rf.STATE_PATH).read_bytes()
    for _ in range(3):
        for _ in range(10):
            work.step()
        sync_all(mount.path)
        wait_caught_up(mount)
    spans = chunk_spans(replica_url)
    assert len(spans) >= 2, spans
    mount.kill9()
    (mount.data / rf.STATE_PATH).write_bytes(old_record)
    mount.mount()
    for _ in range(10):
        work.step()
    sync_all(mount.path)
    wait_caught_up(mount)
    assert any(event.get("event") == "replica: adopted chunks uploaded before a crash"
               for event in mount.events())
    after = chunk_spans(replica_url)
    covered = [lsn for first, last in after for lsn in range(first, last + 1)]
    assert len(covered) == len(set(covered)), f"an LSN is in two chunks: {after}"
    assert after[: len(spans)] == spans and len(ranges(replica_url)) == 1
    restore(replica_url, tmp_path / "restored")
    assert data_dir_tree(tmp_path / "restored") == work.model

