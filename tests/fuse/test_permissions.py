"""Permission semantics of razorfs, compared with ext4 case by case.

Every case runs twice: once in a razorfs mount (``--allow-other``; the kernel checks permissions
through ``default_permissions``) and once in a plain directory on ext4. The operations run as
unprivileged users in forked children and report ``"ok"`` plus the relevant stat fields, or the
errno name; both filesystems must give the same outcomes (and ext4's are checked against the
POSIX/Linux expectation, so that a broken environment does not make both agree on nonsense).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from users import run_as

ALICE, BOB = 1000, 1001  # unprivileged users; neither needs a passwd entry
GROUP = 1234


def as_root(func):
    """Root's outcome in the same shape as ``run_as``'s."""
    try:
        return ("ok", func())
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def ids_and_mode(path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def touch(path, mode: int = 0o644) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def make_file(path: Path, uid: int, gid: int, mode: int, data: bytes = b"data") -> Path:
    """A file with exactly these owner and mode (chmod after chown: chown drops set-id bits)."""
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


@pytest.fixture
def places(make_mount):
    """``{"razorfs": mount root, "ext4": plain directory}``, both root-owned and 0o755."""
    plain = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="razorfs-perm-"))
    try:
        os.chmod(plain, 0o755)
        mount = make_mount("--allow-other")
        os.chown(mount.path, 0, 0)
        os.chmod(mount.path, 0o755)
        yield {"razorfs": mount.path, "ext4": plain}
    finally:
        shutil.rmtree(plain, ignore_errors=True)


def compare(places, scenario, expected):
    """Run ``scenario(base)`` in both places; outcomes must agree, and match ``expected``."""
    outcomes = {name: scenario(base) for name, base in places.items()}
    assert outcomes["ext4"] == expected, f"ext4 itself is not as expected: {outcomes['ext4']}"
    assert outcomes["razorfs"] == outcomes["ext4"], (
        f"razorfs {outcomes['razorfs']} != ext4 {outcomes['ext4']}")


# --- sticky directories -------------------------------------------------------------------------


def test_sticky_directory(places):
    def scenario(base: Path):
        sticky = base / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        results = {"dir": ids_and_mode(sticky)}
        results["alice creates"] = run_as(ALICE, ALICE, sticky,
                                          lambda: (touch("f"), ids_and_mode("f"))[1])
        results["bob creates own"] = run_as(BOB, BOB, sticky,
                                            lambda: (touch("b"), ids_and_mode("b"))[1])
        results["bob unlinks"] = run_as(BOB, BOB, sticky, lambda: os.unlink("f"))
        results["bob renames"] = run_as(BOB, BOB, sticky, lambda: os.rename("f", "g"))
        results["bob renames over"] = run_as(BOB, BOB, sticky, lambda: os.rename("b", "f"))
        results["bob lists"] = run_as(BOB, BOB, sticky,
                                                   lambda: sorted(os.listdir(".")))
        results["alice renames"] = run_as(ALICE, ALICE, sticky, lambda: os.rename("f", "g"))
        results["alice unlinks"] = run_as(ALICE, ALICE, sticky, lambda: os.unlink("g"))
        results["alice creates again"] = run_as(ALICE, ALICE, sticky, lambda: touch("h"))
        results["root renames"] = as_root(lambda: os.rename(sticky / "h", sticky / "i"))
        results["root unlinks"] = as_root(lambda: os.unlink(sticky / "i"))
        results["bob unlinks own"] = run_as(BOB, BOB, sticky, lambda: os.unlink("b"))
        results["left"] = sorted(os.listdir(sticky))
        return results

    compare(places, scenario, {
        "dir": (0, 0, 0o1777),
        "alice creates": ("ok", (ALICE, ALICE, 0o644)),
        "bob creates own": ("ok", (BOB, BOB, 0o644)),
        "bob unlinks": "EPERM",
        "bob renames": "EPERM",
        "bob renames over": "EPERM",
        "bob lists": ("ok", ["b", "f"]),
        "alice renames": ("ok", None),
        "alice unlinks": ("ok", None),
        "alice creates again": ("ok", None),
        "root renames": ("ok", None),
        "root unlinks": ("ok", None),
        "bob unlinks own": ("ok", None),
        "left": [],
    })


# --- setgid directories -------------------------------------------------------------------------


def test_setgid_directory_inheritance(places):
    def scenario(base: Path):
        shared = base / "shared"
        shared.mkdir()
        os.chown(shared, 0, GROUP)
        os.chmod(shared, 0o2775)
        results = {"dir": ids_and_mode(shared)}
        results["root file"] = as_root(lambda: (touch(shared / "f", 0o644),
                                                ids_and_mode(shared / "f"))[1])
        results["root subdir"] = as_root(lambda: (os.mkdir(shared / "d", 0o755),
                                                  ids_and_mode(shared / "d"))[1])
        results["root nested file"] = as_root(lambda: (touch(shared / "d" / "g", 0o600),
                                                       ids_and_mode(shared / "d" / "g"))[1])
        results["root symlink"] = as_root(lambda: (os.symlink("f", shared / "l"),
                                                   os.lstat(shared / "l").st_gid)[1])
        return results

    compare(places, scenario, {
        "dir": (0, GROUP, 0o2775),
        "root file": ("ok", (0, GROUP, 0o644)),
        "root subdir": ("ok", (0, GROUP, 0o2755)),
        "root nested file": ("ok", (0, GROUP, 0o600)),
        "root symlink": ("ok", GROUP),
    })


def test_setgid_directory_non_member(places):
    """A user outside the directory's group: its files still get the group, but the kernel
    strips a requested setgid bit it is not entitled to (at create and at chmod)."""
    def scenario(base: Path):
        shared = base / "shared"
        shared.mkdir()
        os.chown(shared, 0, GROUP)
        os.chmod(shared, 0o2777)

        def create_setgid():
            old = os.umask(0)
            try:
                touch("f", 0o2775)
            finally:
                os.umask(old)
            return ids_and_mode("f")

        def chmod_setgid():
            os.chmod("f", 0o2755)
            return ids_and_mode("f")

        def mkdir_in():
            os.mkdir("d", 0o755)
            return ids_and_mode("d")

        return {"create": run_as(ALICE, ALICE, shared, create_setgid),
                "chmod": run_as(ALICE, ALICE, shared, chmod_setgid),
                "mkdir": run_as(ALICE, ALICE, shared, mkdir_in)}

    compare(places, scenario, {
        "create": ("ok", (ALICE, GROUP, 0o0775)),
        "chmod": ("ok", (ALICE, GROUP, 0o0755)),
        "mkdir": ("ok", (ALICE, GROUP, 0o2755)),
    })


# --- chown of set-id files ----------------------------------------------------------------------


def test_chown_by_owner_clears_setid(places):
    def scenario(base: Path):
        make_file(base / "same", ALICE, ALICE, 0o6755)
        make_file(base / "other", ALICE, ALICE, 0o6755)
        make_file(base / "foreign", ALICE, ALICE, 0o6755)
        make_file(base / "noexec", ALICE, ALICE, 0o6745)  # setgid without group x: a lock mark

        def chown(name, gid):
            def op():
                os.chown(name, -1, gid)
                return ids_and_mode(name)
            return op

        return {
            "to own gid": run_as(ALICE, ALICE, base, chown("same", ALICE), groups=(ALICE,)),
            "to member gid": run_as(ALICE, ALICE, base, chown("other", GROUP),
                                    groups=(ALICE, GROUP)),
            "to foreign gid": run_as(ALICE, ALICE, base, chown("foreign", GROUP)),
            "foreign untouched": ids_and_mode(base / "foreign"),
            "mandatory-lock mark": run_as(ALICE, ALICE, base, chown("noexec", ALICE)),
            "by non-owner": run_as(BOB, BOB, base, chown("foreign", BOB), groups=(BOB,)),
        }

    compare(places, scenario, {
        "to own gid": ("ok", (ALICE, ALICE, 0o0755)),
        "to member gid": ("ok", (ALICE, GROUP, 0o0755)),
        "to foreign gid": "EPERM",
        "foreign untouched": (ALICE, ALICE, 0o6755),
        "mandatory-lock mark": ("ok", (ALICE, ALICE, 0o2745)),
        "by non-owner": "EPERM",
    })


def test_chown_by_root_clears_setid(places):
    def scenario(base: Path):
        path = make_file(base / "f", ALICE, ALICE, 0o6755)
        return as_root(lambda: (os.chown(path, BOB, BOB), ids_and_mode(path))[1])

    compare(places, scenario, ("ok", (BOB, BOB, 0o0755)))


# --- writes by others drop set-id bits ----------------------------------------------------------


SETID_MODES = pytest.mark.parametrize("mode, after", [
    (0o4777, 0o0777), (0o6777, 0o0777), (0o2777, 0o0777),
    # no group x: dropped too, since the writer is not in the file's group (Linux >= 6.x,
    # setattr_should_drop_sgid). The kernel's FUSE client leaves this case to razorfs.
    (0o2767, 0o0767),
], ids=["setuid", "setuid+setgid", "setgid", "setgid-without-group-x"])


@SETID_MODES
def test_write_by_non_owner_clears_setid(places, mode, after):
    def scenario(base: Path):
        make_file(base / "f", ALICE, ALICE, mode)

        def append():
            with open("f", "ab") as stream:
                stream.write(b"more")
            st = os.stat("f")
            return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_size

        return {"write": run_as(BOB, BOB, base, append),
                "seen by root": ids_and_mode(base / "f"),
                "content": (base / "f").read_bytes()}

    compare(places, scenario, {"write": ("ok", (ALICE, ALICE, after, 8)),
                               "seen by root": (ALICE, ALICE, after),
                               "content": b"datamore"})


@SETID_MODES
def test_truncate_by_non_owner_clears_setid(places, mode, after):
    def scenario(base: Path):
        make_file(base / "f", ALICE, ALICE, mode)

        def truncate():
            os.truncate("f", 2)
            return ids_and_mode("f"), os.stat("f").st_size

        return run_as(BOB, BOB, base, truncate)

    compare(places, scenario, ("ok", ((ALICE, ALICE, after), 2)))


# --- permission denied ------------------------------------------------------------------------


def test_permission_denied(places):
    def scenario(base: Path):
        make_file(base / "private", ALICE, ALICE, 0o600, b"secret")
        make_file(base / "readonly", ALICE, ALICE, 0o444)
        closed = base / "closed"
        closed.mkdir()
        os.chmod(closed, 0o755)
        make_file(closed / "inside", 0, 0, 0o666)
        return {
            "bob reads private": run_as(BOB, BOB, base, lambda: Path("private").read_bytes()),
            "alice reads private": run_as(ALICE, ALICE, base,
                                          lambda: Path("private").read_bytes()),
            "bob creates in 0755 root dir": run_as(BOB, BOB, closed, lambda: touch("new")),
            "bob mkdir in 0755 root dir": run_as(BOB, BOB, closed, lambda: os.mkdir("new")),
            "bob unlinks in 0755 root dir": run_as(BOB, BOB, closed,
                                                   lambda: os.unlink("inside")),
            "bob writes 0666 file in it": run_as(BOB, BOB, closed,
                                                 lambda: Path("inside").write_bytes(b"ok")),
            "access W_OK read-only": run_as(ALICE, ALICE, base,
                                            lambda: os.access("readonly", os.W_OK)),
            "open for write read-only": run_as(ALICE, ALICE, base,
                                               lambda: os.close(os.open("readonly",
                                                                        os.O_WRONLY))),
            "access R_OK read-only": run_as(ALICE, ALICE, base,
                                            lambda: os.access("readonly", os.R_OK)),
            "chmod by non-owner": run_as(BOB, BOB, base, lambda: os.chmod("private", 0o644)),
            "left in closed": sorted(os.listdir(closed)),
        }

    compare(places, scenario, {
        "bob reads private": "EACCES",
        "alice reads private": ("ok", b"secret"),
        "bob creates in 0755 root dir": "EACCES",
        "bob mkdir in 0755 root dir": "EACCES",
        "bob unlinks in 0755 root dir": "EACCES",
        "bob writes 0666 file in it": ("ok", 2),
        "access W_OK read-only": ("ok", False),
        "open for write read-only": "EACCES",
        "access R_OK read-only": ("ok", True),
        "chmod by non-owner": "EPERM",
        "left in closed": ["inside"],
    })


def test_access_w_ok_errno(places):
    """``os.access`` hides the errno: ask access(2) through libc for it."""
    def scenario(base: Path):
        make_file(base / "readonly", ALICE, ALICE, 0o444)

        def faccess():
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.access(b"readonly", os.W_OK) != 0:
                raise OSError(ctypes.get_errno(), "access")
            return 0

        return run_as(ALICE, ALICE, base, faccess)

    compare(places, scenario, "EACCES")


@SETID_MODES
def test_open_truncate_by_non_owner_clears_setid(places, mode, after):
    """open(O_TRUNC) reaches razorfs as OPEN (atomic_o_trunc), with no setattr from the kernel:
    clearing the set-id bits there is razorfs's job."""
    def scenario(base: Path):
        make_file(base / "f", ALICE, ALICE, mode)

        def reopen():
            os.close(os.open("f", os.O_WRONLY | os.O_TRUNC))
            return ids_and_mode("f"), os.stat("f").st_size

        return run_as(BOB, BOB, base, reopen)

    compare(places, scenario, ("ok", ((ALICE, ALICE, after), 0)))


def test_setgid_without_group_x_kept_for_group_members(places):
    """A writer in the file's group by a supplementary group keeps a setgid bit without group
    execute (it marks mandatory locking, not privilege); one by its own gid too."""
    def scenario(base: Path):
        make_file(base / "f", ALICE, GROUP, 0o2767)
        make_file(base / "g", ALICE, GROUP, 0o2767)

        def append(name):
            def op():
                with open(name, "ab") as stream:
                    stream.write(b"more")
                return ids_and_mode(name)
            return op

        return {"supplementary": run_as(BOB, BOB, base, append("f"), groups=(GROUP,)),
                "primary": run_as(BOB, GROUP, base, append("g"))}

    compare(places, scenario, {"supplementary": ("ok", (ALICE, GROUP, 0o2767)),
                               "primary": ("ok", (ALICE, GROUP, 0o2767))})
