"""Real power cuts: razorfs's data directory on a loop-mounted ext4 that is shut down unflushed.

The data directory lives on an ext4 image of its own, on a loop device. Each round, the real
daemon (the ``razorfs`` CLI) serves WRITERS writer processes (``powercut_writer.py``: replace
files through a rename, append to logs, create files, make directories, remove files), which
journal on the host what each fsync acknowledged (with ``--durability sync``: every call that
returned). At a random moment the ext4 is shut down with EXT4_IOC_SHUTDOWN and
EXT4_GOING_FLAGS_NOLOGFLUSH, as xfstests' ``godown`` does: from then on ext4 sends nothing more
to the device and fails every call, and its dirty page cache and the journal transaction it
had not committed are lost, as at a power cut. The daemon keeps running into the
dead disk for a moment (it must acknowledge nothing more), is killed with SIGKILL, the FUSE
mount detached; the ext4 is unmounted and mounted again (journal replay), ``razorfs fsck`` must
find the data directory clean, razorfs mounts it (its own recovery), and every writer's files
must hold their acknowledged state or a later one they tried, never anything else. The next
round goes on from there. The first cut comes right after ``razorfs mkfs`` returned (the new
filesystem must mount after it), the last right after a clean ``razorfs umount`` returned
(nothing written before it may be lost). The ext4 is mounted with a one-minute journal commit
interval, in data=ordered or data=writeback mode by turns: nothing razorfs did not flush itself
reaches the disk by a timer within a round.

Whether the cut is real is checked every round: a canary file written on the ext4 without
fsync right before the shutdown must be gone after it. The loop device uses direct I/O, so the
image file's page cache on the host holds nothing of it. What ext4 had sent to the device
survives even if no cache flush followed (a disk's volatile cache could lose it: there this
cut is kinder than a power cut); what it had not sent is lost.

    RAZORFS_LONG=1   many more rounds;  RAZORFS_SEED=N   replay the moments and choices of a run
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fuse.conftest import FUSE_USABLE, Mount, mounted_at

from .powercut_writer import content, stream

LONG = bool(os.environ.get("RAZORFS_LONG"))
ROUNDS = {"fsync": 40 if LONG else 6, "sync": 20 if LONG else 3}
SEED = int(os.environ.get("RAZORFS_SEED") or random.randrange(1 << 32))
WRITERS = 3
IMAGE_BYTES = 512 << 20  # the allocator keeps 64 MiB free for the log and checkpoints
WRITER_SCRIPT = Path(__file__).with_name("powercut_writer.py")
EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): linux/fs/ext4/ext4.h, as XFS' GOINGDOWN
EXT4_GOING_FLAGS_NOLOGFLUSH = 0x2  # do not flush the journal: what was not committed is lost
ABSENT, DIRECTORY = ("absent",), ("dir",)
# ext4 commits its journal by itself every 5 s by default; razorfs must not count on it.
MOUNT_OPTIONS = ("commit=60", "commit=60,data=writeback")

pytestmark = pytest.mark.timeout(3600 if LONG else 400)


def need(condition: bool, message: str) -> None:
    """Skip when the machine cannot run this test, but fail under CI: a skip would hide it."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the ext4 power-cut test")
        pytest.skip(message)


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)}: exit {result.returncode}: "
                             f"{result.stdout}{result.stderr}")
    return result


class LoopExt4:
    """An ext4 image on a loop device (direct I/O), mounted at ``root/ext4``."""

    def __init__(self, root: Path) -> None:
        self.image = root / "ext4.img"
        self.path = root / "ext4"
        self.device: str | None = None
        self.direct_io = False
        self.mounts = 0
        self.canary_bytes = b""

    def create(self) -> LoopExt4:
        need(os.geteuid() == 0, "loop devices and mount(2) need root")
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            need(shutil.which(tool) is not None, f"{tool} is missing (util-linux, e2fsprogs)")
        if not os.path.exists("/dev/loop-control"):
            run("modprobe", "loop", check=False)
        with open(self.image, "wb") as image:
            image.truncate(IMAGE_BYTES)
        attach = run("losetup", "--find", "--show", "--direct-io=on", str(self.image),
                     check=False)
        if attach.returncode != 0:
            # The image's filesystem has no O_DIRECT: buffered, the canary still proves the cut.
            attach = run("losetup", "--find", "--show", str(self.image), check=False)
        need(attach.returncode == 0, f"no loop device: {attach.stderr.strip()}")
        self.device = attach.stdout.strip()
        self.direct_io = run("losetup", "--list", "--noheadings", "--output", "DIO",
                             self.device).stdout.strip() == "1"
        run("mkfs.ext4", "-q", "-F", str(self.device))
        self.path.mkdir()
        self.mount()
        return self

    def mount(self) -> None:
        options = MOUNT_OPTIONS[self.mounts % len(MOUNT_OPTIONS)]
        self.mounts += 1
        mounted = run("mount", "-t", "ext4", "-o", options, str(self.device), str(self.path),
                      check=False)
        need(mounted.returncode == 0, f"cannot mount ext4 -o {options}: "
                                      f"{mounted.stderr.strip()}")

    def write_canary(self) -> None:
        """A file written and never flushed: a real power cut must take it."""
        self.canary_bytes = os.urandom(256 << 10)
        (self.path / "canary").write_bytes(self.canary_bytes)

    def shutdown(self) -> None:
        """The power cut: ext4 stops here, without committing its journal."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def power_cut(self) -> None:
        self.write_canary()
        self.shutdown()

    def power_on(self) -> None:
        """Unmount the dead filesystem, mount it again (journal replay), check the canary."""
        deadline = time.monotonic() + 30
        # A killed daemon's leader is a zombie before its worker threads, which hold the files
        # open, have finished exiting: busy for a moment.
        while (unmount := run("umount", str(self.path), check=False)).returncode != 0:
            assert "busy" in unmount.stderr and time.monotonic() < deadline, unmount.stderr
            time.sleep(0.05)
        self.wait_released(deadline)
        self.mount()
        canary = self.path / "canary"
        survived = canary.exists() and canary.read_bytes() == self.canary_bytes
        assert not survived, ("a file written without fsync survived the shutdown: the power "
                              "cut is not real, and this test would prove nothing")
        canary.unlink(missing_ok=True)

    def wait_released(self, deadline: float) -> None:
        """Until the ext4 is gone from every mount namespace: one created meanwhile (a
        container starting) holds a copy of the mount for a moment, and a mount now would
        take up the same dead superblock instead of replaying the journal. A mounted block
        device cannot be opened with O_EXCL."""
        while True:
            try:
                os.close(os.open(self.device, os.O_RDONLY | os.O_EXCL))
                return
            except OSError as exc:
                assert exc.errno == errno.EBUSY and time.monotonic() < deadline, (
                    f"{self.device} is still mounted somewhere after umount: {exc}")
            time.sleep(0.05)

    def destroy(self) -> None:
        if mounted_at(self.path):
            if run("umount", str(self.path), check=False).returncode != 0:
                run("umount", "-l", str(self.path))
        if self.device:
            run("losetup", "--detach", self.device)
            self.device = None


@pytest.fixture
def ext4(tmp_path):
    need(FUSE_USABLE, "real FUSE tests need root, /dev/fuse and fusermount3")
    fs = LoopExt4(tmp_path)
    try:
        yield fs.create()
    finally:
        fs.destroy()


# ---- what each writer was promised, and what it finds ----

def read_journal(path: Path) -> tuple[dict[str, list[tuple[int, list]]], int, str | None]:
    """(path -> [(step, spec)] in order, the last acknowledged step, how the writer ended)."""
    tries: dict[str, list[tuple[int, list]]] = {}
    acked, end = 0, None
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record[0] == "try":
                tries.setdefault(record[2], []).append((record[1], record[3]))
            elif record[0] == "ack":
                acked = record[1]
            else:
                end = record[1]
    return tries, acked, end


def found_state(directory: Path) -> dict[str, tuple]:
    """Every path below ``directory``: ("dir",) or ("bytes", content)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        found[rel] = DIRECTORY if path.is_dir() else ("bytes", path.read_bytes())
    return found


def describe(state: tuple) -> str:
    if state[0] != "bytes":
        return state[0]
    return f"{len(state[1])} bytes starting {state[1][:40]!r}"


def allowed(got: tuple, spec: list, writer: int, *, whole: bool) -> bool:
    """Whether ``got`` is what ``spec`` tried (a prefix of it too unless ``whole``)."""
    kind = spec[0]
    if kind in ("absent", "dir"):
        return got == tuple(spec)
    if got[0] != "bytes":
        return False
    want = content(spec[1]) if kind == "file" else stream(writer, spec[1])[: spec[2]]
    return got[1] == want or (not whole and want.startswith(got[1]))


class WriterModel:
    """What one writer's directory may hold: the state verified at the end of the previous
    round (``baseline``), then this round's journal."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = f"w{index}"
        self.baseline: dict[str, tuple] = {}
        self.acked_steps = 0

    def verify(self, directory: Path, journal: Path, label: str) -> None:
        tries, acked, _ = read_journal(journal)
        self.acked_steps += acked
        assert directory.is_dir(), f"{label}: {directory}, made durable before round 1, is gone"
        found = found_state(directory)
        problems = []
        for path in sorted(set(found) | set(tries) | set(self.baseline)):
            got = found.get(path, ABSENT)
            history = tries.get(path, [])
            done = [spec for step, spec in history if step <= acked]
            later = [spec for step, spec in history if step > acked]
            if history and history[0][1][0] == "log":
                ok = self._log_allowed(got, path, done, later)
            else:
                base_ok = (allowed(got, done[-1], self.index, whole=True) if done
                           else got == self.baseline.get(path, ABSENT))
                ok = base_ok or any(allowed(got, spec, self.index, whole=False)
                                    for spec in later)
            if not ok:
                problems.append(
                    f"{self.name}/{path}: found {describe(got)}; acknowledged "
                    f"{done[-1] if done else describe(self.baseline.get(path, ABSENT))}, "
                    f"tried after that {later}")
        assert not problems, f"{label}: acknowledged state lost or mangled " \
                             f"(last acknowledged step {acked}):\n" + "\n".join(problems[:20])
        self.baseline = found

    def _log_allowed(self, got: tuple, path: str, done: list, later: list) -> bool:
        """A log holds its stream, from its acknowledged length up to the longest tried."""
        base = self.baseline.get(path, ABSENT)
        shortest = done[-1][2] if done else (len(base[1]) if base != ABSENT else 0)
        longest = max([shortest] + [spec[2] for spec in later])
        if got == ABSENT:
            return shortest == 0 and not done and base == ABSENT
        return (got[0] == "bytes" and shortest <= len(got[1]) <= longest
                and got[1] == stream(self.index, path)[: len(got[1])])


# ---- the rounds ----

def start_writers(mount: Mount, journals: Path, round_number: int, rng: random.Random,
                  durability: str) -> list[tuple[subprocess.Popen, Path]]:
    writers = []
    for index in range(WRITERS):
        journal = journals / f"round{round_number}-w{index}.jsonl"
        errors = journal.with_suffix(".stderr")
        with open(errors, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(WRITER_SCRIPT), str(mount.path / f"w{index}"),
                 str(journal), str(index), str(round_number), str(rng.randrange(1 << 32)),
                 durability], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr)
        writers.append((process, journal))
    return writers


def stop_writers(writers: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every writer to end (on the errors of a dead disk or mount); fail on a hang
    or on any other error."""
    problems = []
    for process, journal in writers:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            problems.append(f"writer {journal.name} hangs on the dead mount")
        if process.returncode:
            problems.append(f"writer {journal.name} exit {process.returncode}: "
                            f"{journal.with_suffix('.stderr').read_text()[-2000:]}")
    assert not problems, "\n".join(problems)


def kill_writers(writers: list[tuple[subprocess.Popen, Path]]) -> None:
    for process, _ in writers:
        if process.poll() is None:
            process.kill()
            process.wait()


def power_cut_round(ext4: LoopExt4, mount: Mount, models: list[WriterModel], journals: Path,
                    round_number: int, rng: random.Random, durability: str) -> None:
    label = f"RAZORFS_SEED={SEED} --durability {durability} round {round_number}"
    writers = start_writers(mount, journals, round_number, rng, durability)
    try:
        time.sleep(rng.uniform(0.3, 2.0))
        ext4.power_cut()
        time.sleep(rng.uniform(0, 0.3))  # the daemon meets the dead disk: no more acks
        mount.kill9()
        stop_writers(writers)
    finally:
        kill_writers(writers)
    ext4.power_on()
    check = mount.fsck()
    assert check.returncode == 0, f"{label}: fsck after the power cut: {check.stdout}" \
                                  f"{check.stderr}"
    mount.mount()
    for model, (_, journal) in zip(models, writers):
        model.verify(mount.path / model.name, journal, label)


def clean_unmount_then_power_cut(ext4: LoopExt4, mount: Mount, label: str) -> None:
    """Changes never fsync'd, a clean ``razorfs umount``, the power cut right after: the
    unmount must have made all of them durable (the commit interval is long: nothing else
    commits them)."""
    mount.unmount()
    mount.mount("--commit-interval", "600")
    expected = {}
    directory = mount.path / "unmounted"
    directory.mkdir()
    for i in range(20):
        expected[f"f{i}"] = data = content(f"clean unmount {i}")
        (directory / f"f{i}").write_bytes(data)
    os.rename(directory / "f0", directory / "renamed")
    expected["renamed"] = expected.pop("f0")
    os.unlink(directory / "f1")
    del expected["f1"]
    with open(directory / "f2", "r+b") as stream_:
        stream_.truncate(10)
    expected["f2"] = expected["f2"][:10]
    mount.unmount()
    ext4.power_cut()
    ext4.power_on()
    check = mount.fsck()
    assert check.returncode == 0, f"{label}: fsck: {check.stdout}{check.stderr}"
    mount.mount()
    assert directory.is_dir(), f"{label}: {directory.name}/ lost after a clean unmount"
    got = {path.name: path.read_bytes() for path in directory.iterdir()}
    assert got.keys() == expected.keys(), f"{label}: names after a clean unmount and a power " \
                                          f"cut: {sorted(got)}, expected {sorted(expected)}"
    lost = [name for name in expected if got[name] != expected[name]]
    assert not lost, f"{label}: contents lost after a clean unmount and a power cut: {lost}"


@pytest.mark.parametrize("durability", ["fsync", "sync"])
def test_power_cuts_on_ext4(ext4, tmp_path, durability):
    log = tmp_path / "razorfs.log"  # on the host: the daemon's disk is the one cut
    mount = Mount(tmp_path, "--durability", durability, "--log-file", str(log),
                  data=ext4.path / "data", path=tmp_path / "mnt")
    mount.log = log
    journals = tmp_path / "journals"
    journals.mkdir()
    models = [WriterModel(i) for i in range(WRITERS)]
    rng = random.Random(f"{SEED} {durability}")
    started = time.monotonic()
    try:
        mount.mkfs()
        ext4.power_cut()  # right after mkfs returned: the new filesystem must be there
        ext4.power_on()
        try:
            mount.mount()
        except AssertionError as exc:
            raise AssertionError(f"power cut right after mkfs: {exc}") from None
        for model in models:
            (mount.path / model.name).mkdir()
        fd = os.open(mount.path, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        for round_number in range(1, ROUNDS[durability] + 1):
            power_cut_round(ext4, mount, models, journals, round_number, rng, durability)
        clean_unmount_then_power_cut(ext4, mount, f"RAZORFS_SEED={SEED} --durability "
                                                  f"{durability}, clean unmount")
        mount.unmount()
    finally:
        mount.cleanup()
    unexpected = [e for e in mount.events(since=0) if e.get("event") == "unexpected error"]
    assert not unexpected, f"requests that ended in the unexpected-error edge: {unexpected[:3]}"
    acked = [model.acked_steps for model in models]
    print(f"ext4 power cuts ({durability}): seed {SEED}, {ROUNDS[durability]} rounds, "
          f"acknowledged steps per writer {acked}, loop direct I/O {ext4.direct_io}, "
          f"{time.monotonic() - started:.1f} s")
    assert sum(acked) > 0, "the writers never got an acknowledgement before a power cut"
