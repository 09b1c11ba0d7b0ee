"""Issue 13: the unit and fstab lines under a real systemd (PID 1 of a container), driven as a
user would: systemctl, journalctl, kill, mount(8) through fstab."""

from __future__ import annotations

import json
import os
import time

import pytest

from .conftest import data_dir, mountpoint

pytestmark = pytest.mark.timeout(120)


def wait_for(condition, timeout: float = 30.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)
    return result


def show(box, unit: str, prop: str) -> str:
    return box.run("systemctl", "show", "-P", prop, unit, check=True).stdout.strip()


def journal(box, *matches: str, unit: str | None = None) -> list[dict]:
    """Journal entries (``journalctl -o json``) matching FIELD=VALUE ``matches``."""
    box.run("journalctl", "--sync")
    command = ["journalctl", "--no-pager", "-o", "json", *matches]
    if unit:
        command += ["-u", unit]
    result = box.run(*command, check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def invocation_events(box, unit: str, event: str) -> list[dict]:
    """The entries with EVENT=``event`` logged by the unit's current run."""
    return journal(box, f"EVENT={event}",
                   f"_SYSTEMD_INVOCATION_ID={show(box, unit, 'InvocationID')}", unit=unit)


def write_synced(path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def service(box):
    """Factory: ``service(name, dropin=None)`` → unit ``razorfs@name.service`` with a fresh
    filesystem (and the drop-in's text, if any); stopped at the end of the test."""
    units = []

    def make(name: str, dropin: str | None = None) -> str:
        unit = f"razorfs@{name}.service"
        box.run("razorfs", "mkfs", data_dir(name), check=True)
        box.run("mkdir", "-p", mountpoint(name), check=True)
        if dropin:
            box.write(f"/etc/systemd/system/{unit}.d/test.conf", dropin)
            box.run("systemctl", "daemon-reload", check=True)
        units.append(unit)
        return unit

    yield make
    for unit in units:
        box.run("systemctl", "stop", unit)
        box.run("systemctl", "reset-failed", unit)


def start(box, unit: str) -> int:
    """systemctl start (it returns once READY=1 arrived); the main PID, as the container
    numbers it."""
    box.run("systemctl", "start", unit, check=True)
    return int(show(box, unit, "MainPID"))


def restarted(box, unit: str, old_pid: int) -> int:
    """Wait until systemd restarted the unit under a new main PID and it is active again."""
    def new_pid():
        pid = int(show(box, unit, "MainPID"))
        return pid if pid not in (0, old_pid) and show(box, unit, "ActiveState") == "active" \
            else None
    return wait_for(new_pid, what=f"{unit} to be restarted")


# --- the templated service ---------------------------------------------------------------------


def test_ready_only_once_the_mount_is_visible_outside(box, service):
    unit = service("ready")
    pid = start(box, unit)
    # Read right after `systemctl start` returned, i.e. after READY=1: the mount is there in
    # the namespace every other process uses, not only in the service's own.
    fstype, source, device = box.mount_entry(mountpoint("ready"))
    assert (fstype, source) == ("fuse.razorfs", data_dir("ready"))
    namespaces = box.run("readlink", f"/proc/{pid}/ns/mnt", "/proc/1/ns/mnt",
                         check=True).stdout.split()
    assert namespaces[0] == namespaces[1]

    (box.inside(mountpoint("ready")) / "landed").write_text("in razorfs")
    stats = json.loads(box.run("razorfs", "stats", mountpoint("ready"), "--json",
                               check=True).stdout)
    assert stats["inodes"] == 2 and stats["requests"]["ops"]["create"]["count"] == 1
    # the service's readahead tuning took effect (/sys is writable without a namespace)
    assert open(f"/sys/class/bdi/{device}/read_ahead_kb").read().strip() == "1024"
    assert not invocation_events(box, unit, "readahead left at the kernel default")

    box.run("systemctl", "stop", unit, check=True)
    assert box.mount_entry(mountpoint("ready")) is None
    assert not (box.inside(mountpoint("ready")) / "landed").exists()  # not on the root disk
    start(box, unit)
    assert (box.inside(mountpoint("ready")) / "landed").read_text() == "in razorfs"


def test_kill9_restarts_with_fsynced_data_intact(box, service):
    unit = service("crash")
    pid = start(box, unit)
    write_synced(box.inside(mountpoint("crash")) / "durable", b"fsync'd before the crash")
    box.run("kill", "-9", str(pid), check=True)

    restarted(box, unit, pid)
    assert show(box, unit, "NRestarts") == "1"
    assert (box.inside(mountpoint("crash")) / "durable").read_bytes() == \
        b"fsync'd before the crash"
    [recovered] = invocation_events(box, unit, "recovered")
    assert int(recovered["REPLAYED"]) > 0  # the crash left log records to replay
    [detached] = invocation_events(box, unit, "detached the mount a killed daemon left behind")
    assert detached["PRIORITY"] == "4" and detached["MOUNTPOINT"] == mountpoint("crash")


def test_watchdog_restarts_a_stopped_daemon(box, service):
    unit = service("wd", dropin="[Service]\nWatchdogSec=2\n")
    pid = start(box, unit)
    write_synced(box.inside(mountpoint("wd")) / "before", b"x")
    box.run("kill", "-STOP", str(pid), check=True)

    restarted(box, unit, pid)
    timeouts = [e for e in journal(box, unit=unit)
                if "Watchdog timeout" in e.get("MESSAGE", "")]
    assert timeouts, "no watchdog timeout in the unit's journal"
    assert (box.inside(mountpoint("wd")) / "before").read_bytes() == b"x"


def test_stop_commits_and_unmounts(box, service):
    unit = service("stop")
    start(box, unit)
    (box.inside(mountpoint("stop")) / "unsynced").write_text("committed at stop")

    result = box.run("systemctl", "stop", unit)
    assert result.returncode == 0, result.stderr
    assert show(box, unit, "ExecMainStatus") == "0"
    assert show(box, unit, "Result") == "success"
    assert box.mount_entry(mountpoint("stop")) is None

    start(box, unit)
    [recovered] = invocation_events(box, unit, "recovered")
    assert recovered["REPLAYED"] == "0"
    assert (box.inside(mountpoint("stop")) / "unsynced").read_text() == "committed at stop"


def test_reload_reopens_the_log_file(box, service):
    log = "/var/log/razorfs-reload.log"
    unit = service("reload", dropin=(
        "[Service]\nExecStart=\n"
        f"ExecStart=/usr/local/bin/razorfs mount {data_dir('reload')} {mountpoint('reload')} "
        f"--foreground --log-file {log}\n"))
    pid = start(box, unit)
    os.rename(box.inside(log), box.inside(log + ".1"))  # what logrotate does

    assert box.run("systemctl", "reload", unit).returncode == 0
    reopened = box.inside(log)
    wait_for(lambda: reopened.exists() and "log reopened" in reopened.read_text(),
             what="the log to be reopened")
    assert int(show(box, unit, "MainPID")) == pid  # reopened, not restarted
    (box.inside(mountpoint("reload")) / "after").write_text("still serving")
    assert "log reopened" not in box.inside(log + ".1").read_text()


def test_journal_fields_are_searchable(box, service):
    unit = service("journal")
    start(box, unit)
    [recovered] = journal(box, "EVENT=recovered", unit=unit)
    assert recovered["REPLAYED"] == "0" and recovered["INODES"] == "1"
    assert recovered["PRIORITY"] == "6" and recovered["SYSLOG_IDENTIFIER"] == "razorfs"
    assert recovered["MESSAGE"].startswith("recovered ")
    [mounted] = journal(box, "EVENT=mounted", f"MOUNTPOINT={mountpoint('journal')}", unit=unit)
    assert mounted["DURABILITY"] == "fsync"
    daemon_lines = journal(box, "SYSLOG_IDENTIFIER=razorfs", unit=unit)
    assert daemon_lines and all("EVENT" in entry for entry in daemon_lines)  # no bare JSON


# --- /etc/fstab and systemd's generated mount units --------------------------------------------


def holder(box, name: str) -> int | None:
    """The pid (container's numbering) holding the data directory's lock, if any."""
    from razorfs.datadir import holder_pid

    return holder_pid(str(box.inside(data_dir(name))))


def test_fstab_line_mounts_at_boot_and_stops_cleanly(box):
    unit = "srv-razorfs-boot.mount"
    assert show(box, unit, "ActiveState") == "active"
    assert box.mount_entry(mountpoint("boot"))[:2] == ("fuse.razorfs", data_dir("boot"))
    daemon = holder(box, "boot")  # alive after mount(8) returned, in the mount unit's cgroup
    assert daemon and unit in box.run("cat", f"/proc/{daemon}/cgroup", check=True).stdout
    assert "local-fs.target" in show(box, unit, "WantedBy")  # nofail: wanted, not required
    write_synced(box.inside(mountpoint("boot")) / "fstab", b"through fstab")
    (box.inside(mountpoint("boot")) / "unsynced").write_text("committed at stop")

    assert box.run("systemctl", "stop", unit).returncode == 0
    assert holder(box, "boot") is None
    assert box.mount_entry(mountpoint("boot")) is None
    log = box.inside(f"{data_dir('boot')}/razorfs.log")
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "stopped cleanly"
    # systemd ran umount(8), which ran umount.fuse.razorfs; it returned only once the daemon
    # had committed and exited (what it says lands in the unit's journal)
    said = " ".join(e.get("MESSAGE", "") for e in journal(box, unit=unit))
    assert f"unmounted {mountpoint('boot')}; daemon" in said and "committed and exited" in said
    leftovers = [e for e in journal(box, unit=unit) if "remains running" in e.get("MESSAGE", "")]
    assert not leftovers

    box.run("systemctl", "start", unit, check=True)
    recovered = [json.loads(line) for line in log.read_text().splitlines()
                 if '"recovered"' in line]
    assert recovered[-1]["replayed"] == 0
    assert (box.inside(mountpoint("boot")) / "unsynced").read_text() == "committed at stop"
    assert (box.inside(mountpoint("boot")) / "fstab").read_bytes() == b"through fstab"


def test_netdev_line_is_a_remote_mount(box):
    unit = "srv-razorfs-net.mount"
    assert show(box, unit, "ActiveState") == "active"
    assert "remote-fs.target" in show(box, unit, "RequiredBy")
    assert "remote-fs-pre.target" in show(box, unit, "After")
    assert box.mount_entry(mountpoint("net"))[0] == "fuse.razorfs"


def test_automount_line_waits_for_first_access(box):
    automount = "srv-razorfs-auto.automount"
    assert show(box, automount, "Where") == mountpoint("auto")
    assert "srv-razorfs-auto.mount" in show(box, automount, "Triggers")
    assert box.mount_entry(mountpoint("auto")) is None or \
        box.mount_entry(mountpoint("auto"))[0] == "autofs"  # not mounted at boot
    assert holder(box, "auto") is None
    if os.path.exists("/dev/autofs"):
        assert show(box, automount, "ActiveState") == "active"
        box.run("ls", mountpoint("auto"), check=True)  # the first access mounts it
    else:
        # This kernel has no autofs (CONFIG_AUTOFS_FS): systemd cannot arm the automount.
        # What the first access would do is start the mount unit it triggers:
        assert "unsupported" in " ".join(e.get("MESSAGE", "")
                                         for e in journal(box, unit=automount))
        box.run("systemctl", "start", "srv-razorfs-auto.mount", check=True)
    assert box.mount_entry(mountpoint("auto"))[:2] == ("fuse.razorfs", data_dir("auto"))
    assert holder(box, "auto") is not None
    (box.inside(mountpoint("auto")) / "file").write_text("automounted")


def test_nofail_line_that_cannot_mount_leaves_the_boot_alone(box):
    assert show(box, "srv-razorfs-missing.mount", "ActiveState") == "failed"
    assert show(box, "local-fs.target", "ActiveState") == "active"
    messages = " ".join(e.get("MESSAGE", "") for e in
                        journal(box, unit="srv-razorfs-missing.mount"))
    assert data_dir("missing") in messages  # the helper said what was wrong
