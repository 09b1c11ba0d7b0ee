"""mount.fuse.razorfs: mount(8)/fstab options to `razorfs mount` arguments."""

from __future__ import annotations

import pytest

from razorfs import cli, mount_helper
from razorfs.mount_helper import translate

BASE = ["mount", "/var/lib/razorfs/a", "/srv/a"]


def test_razorfs_options_are_mapped() -> None:
    options = ("allow_other,ro,durability=sync,commit_interval=0.25,metrics=127.0.0.1:9187,"
               "log_level=debug")
    arguments = translate("/var/lib/razorfs/a", "/srv/a", options)
    assert arguments == BASE + ["--allow-other", "--read-only", "--durability", "sync",
                                "--commit-interval", "0.25", "--metrics", "127.0.0.1:9187",
                                "--log-level", "debug"]
    parsed = cli._parser().parse_args(arguments)  # and the razorfs command line takes them
    assert (parsed.allow_other, parsed.read_only, parsed.durability, parsed.commit_interval,
            parsed.metrics, parsed.log_level) == (True, True, "sync", 0.25, "127.0.0.1:9187",
                                                  "debug")
    assert not parsed.foreground  # mount(8) waits for the helper: it returns once mounted


@pytest.mark.parametrize("options", [
    "", "defaults", "rw", "relatime", "nofail", "_netdev", "x-systemd.automount",
    "x-systemd.requires=network-online.target", "x-systemd.device-timeout=10s",
    "defaults,rw,relatime,nofail,_netdev,x-systemd.automount,,",
])
def test_options_for_mount_8_and_systemd_are_ignored(options) -> None:
    assert translate("/var/lib/razorfs/a", "/srv/a", options) == BASE


def test_ignored_options_mix_with_mapped_ones() -> None:
    assert translate("/d", "/m", "defaults,allow_other,x-systemd.automount,nofail") == [
        "mount", "/d", "/m", "--allow-other"]


@pytest.mark.parametrize("option", [
    "bogus", "uid=1000", "durability", "durability=", "allow_other=1", "ro=yes",
])
def test_unknown_or_malformed_options_are_rejected(option) -> None:
    with pytest.raises(SystemExit) as raised:
        translate("/d", "/m", f"allow_other,{option},noatime")
    assert f"unknown option {option!r}" in str(raised.value.code)


def test_main_runs_razorfs_mount(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert mount_helper.main(["/d", "/m", "-o", "rw,durability=sync", "-n", "-v"]) == 0
    assert calls == [["mount", "/d", "/m", "--durability", "sync"]]


def test_sync_and_noatime_mount_options_are_mapped() -> None:
    assert translate("/d", "/m", "sync,noatime") == ["mount", "/d", "/m", "--durability", "sync",
                                                     "--noatime"]


def test_replica_options_are_mapped() -> None:
    assert translate("/d", "/m", "replica=s3://bucket/fs/a,replica_retention=7d") == [
        "mount", "/d", "/m", "--replica", "s3://bucket/fs/a", "--replica-retention", "7d"]


def test_replica_retention_durations() -> None:
    from razorfs.cli import duration

    assert [duration(text) for text in ("90", "90s", "30m", "12h", "7d", "1.5h")] == [
        90, 90, 1800, 43200, 604800, 5400]
    for bad in ("", "7y", "-3d", "0", "d"):
        with pytest.raises(Exception):
            duration(bad)
# --- issue 18: the standard options of mount(8) and fuse(8), remount ---------------------------

STANDARD_NO_OPS = ["atime", "relatime", "norelatime", "strictatime", "nostrictatime",
                   "nodiratime", "diratime", "lazytime", "nolazytime", "async",
                   "default_permissions", "user_id=0", "group_id=0", "owner", "users"]


@pytest.mark.parametrize("option", STANDARD_NO_OPS)
def test_standard_options_without_effect_are_accepted(option) -> None:
    assert translate("/d", "/m", option) == ["mount", "/d", "/m"]


def test_kernel_flags_reach_the_mount() -> None:
    arguments = translate("/d", "/m", "noexec,suid,dev,nosuid")
    assert arguments == ["mount", "/d", "/m", "--mount-flags", "noexec,dev,nosuid"]
    parsed = cli._parser().parse_args(arguments)
    assert parsed.mount_flags == ("noexec", "dev", "nosuid")


def test_cli_refuses_an_unknown_mount_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["mount", "/d", "/m", "--mount-flags", "noexec,bogus"])
    assert "unknown mount flag 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("options, expected", [
    ("ro,rw", []), ("rw,ro", ["--read-only"]),
    ("noatime,relatime", []), ("relatime,noatime", ["--noatime"]),
    ("sync,async", []), ("dirsync", ["--durability", "sync"]),
    ("durability=sync,durability=fsync", ["--durability", "fsync"]),
    ("exec,noexec", ["--mount-flags", "noexec"]), ("noexec,exec", ["--mount-flags", "exec"]),
])
def test_the_last_of_contradicting_options_wins(options, expected) -> None:
    assert translate("/d", "/m", options) == ["mount", "/d", "/m", *expected]


def test_remount_request() -> None:
    # what mount(8) hands the helper for `mount -o remount,ro,noatime /m`
    request = mount_helper.parse("ro,nosuid,nodev,relatime,remount,noatime,user_id=0,"
                                 "group_id=0,default_permissions")
    assert request.remount and request.read_only and request.noatime
    assert not mount_helper.parse("rw,relatime").remount


def test_remount_flags_start_from_the_mounts_own() -> None:
    ms = mount_helper
    flags = ms.remount_flags("rw,nosuid,nodev,relatime", ms.parse("remount,ro"))
    assert flags == (ms._MS_REMOUNT | ms._MS_RDONLY | ms._MS_NOSUID | ms._MS_NODEV
                     | ms._MS_RELATIME)
    flags = ms.remount_flags("ro,nosuid,nodev,noexec,relatime", ms.parse("remount,rw,noatime"))
    assert flags == (ms._MS_REMOUNT | ms._MS_NOSUID | ms._MS_NODEV | ms._MS_NOEXEC
                     | ms._MS_NOATIME)
    flags = ms.remount_flags("rw,nosuid,nodev,relatime", ms.parse("remount,suid,strictatime"))
    assert flags == ms._MS_REMOUNT | ms._MS_NODEV | ms._MS_STRICTATIME
