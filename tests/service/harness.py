"""A real systemd (PID 1) booted in a throwaway container, for the service tests.

The container's root is this machine's own ``/`` under an overlay whose writable layer is a
tmpfs: every write of the container (its boot, its journal, the units and data directories the
tests make) stays in RAM and is gone after ``stop``. ``systemd-nspawn --boot`` runs it; booting
/lib/systemd/systemd in a bare ``unshare`` instead would run the boot's ``systemd-tmpfiles
--remove`` on the machine's real /tmp.

razorfs runs there from a venv made with Debian's /usr/bin/python3 (the project's own venv may
use an interpreter under /root, which the container's units must not depend on), cached under
``/var/lib/razorfs-tests`` with razorfs's dependencies only; this checkout's code is installed
into the container's overlay, never into that cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SERVICE_PYTHON = "/usr/bin/python3"
VENV_CACHE = Path("/var/lib/razorfs-tests")
BOOT_TIMEOUT = 90


class BoxError(RuntimeError):
    """The container could not be made or booted."""


def service_venv() -> Path:
    """A venv of /usr/bin/python3 holding razorfs's dependencies (not razorfs itself), made
    once per dependency list and interpreter, shared by every checkout on this machine."""
    interpreter = subprocess.run([SERVICE_PYTHON, "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\n".join([interpreter, *_dependencies()]).encode()).hexdigest()[:16]
    venv = VENV_CACHE / f"venv-{key}"
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another checkout may be making the same venv
        if (venv / "complete").exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        _run([SERVICE_PYTHON, "-m", "venv", str(venv)], "make the service venv")
        pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q",
               "--disable-pip-version-check"]
        # setuptools for the --no-build-isolation install of the checkout into the container
        _run(pip + ["setuptools>=68", "wheel", *_dependencies()], "install dependencies")
        (venv / "complete").write_text("")
    return venv


def _dependencies() -> list[str]:
    import tomllib

    with open(PROJECT / "pyproject.toml", "rb") as stream:
        return tomllib.load(stream)["project"]["dependencies"]


def _run(command: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BoxError(f"{what} failed ({' '.join(command)}):\n{result.stdout}{result.stderr}")
    return result


class SystemdBox:
    """``start()`` boots, ``run(...)`` runs a command inside as root, ``stop()`` powers off
    and removes every mount it made. ``root`` is the container's / as seen from here: files
    written there before or after the boot appear inside."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.layer = self.workdir / "rw"
        self.root = self.workdir / "root"
        self.log = self.workdir / "nspawn.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None

    # ---- set-up before the boot ----

    def prepare(self) -> None:
        """The overlay: the machine's / read-only below, a tmpfs for every write above."""
        self.layer.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", "size=4G,mode=0755", "tmpfs", str(self.layer)],
             "mount the overlay's tmpfs")
        (self.layer / "upper").mkdir()
        (self.layer / "work").mkdir()
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir=/,upperdir={self.layer / 'upper'},workdir={self.layer / 'work'}",
              str(self.root)], "mount the overlay")

    def install_razorfs(self, venv: Path) -> None:
        """This checkout's razorfs into ``venv`` as the container sees it (the cache itself
        is left alone), linked where README tells a user to link it."""
        with tempfile.TemporaryDirectory() as source:
            for name in ("pyproject.toml", "README.md"):
                shutil.copy(PROJECT / name, source)
            shutil.copytree(PROJECT / "razorfs", Path(source) / "razorfs",
                            ignore=shutil.ignore_patterns("__pycache__"))
            _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--disable-pip-version-check",
                  "--no-warn-script-location", "--root", str(self.root), source],
                 "install razorfs into the container")
        self.symlink("/usr/local/bin/razorfs", venv / "bin/razorfs")
        self.symlink("/usr/sbin/mount.fuse.razorfs", venv / "bin/mount.fuse.razorfs")
        self.symlink("/usr/sbin/umount.fuse.razorfs", venv / "bin/umount.fuse.razorfs")

    def path(self, inside: str | Path) -> Path:
        """The host path of ``inside`` (an absolute path in the container)."""
        return self.root / str(inside).lstrip("/")

    def write(self, inside: str, text: str) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def symlink(self, inside: str, target: Path | str) -> None:
        link = self.path(inside)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    # ---- life cycle ----

    def boot(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            # --private-network: nothing the container's boot starts can reach or bind the
            # machine's network; the units under test need none.
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
                 "--private-network", "--bind=/dev/fuse", "--console=passive",
                 *(["--bind=/dev/autofs"] if os.path.exists("/dev/autofs") else []),
                 "-D", str(self.root)],
                cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                # /sys writable, as on a machine without a container: the daemon tunes its
                # mount's readahead there
                env={**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1"})
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.leader is None:
            if self.nspawn.poll() is not None:
                raise BoxError(f"systemd-nspawn exited ({self.nspawn.returncode}): "
                               f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise BoxError(f"no systemd in the container after {BOOT_TIMEOUT}s")
            self.leader = _child_named(self.nspawn.pid, "systemd")
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise BoxError(f"container's systemd is {state!r} after {BOOT_TIMEOUT}s: "
                               f"{self.run('systemctl', '--failed', '--no-pager').stdout}")
            time.sleep(0.1)  # its manager answers on the bus only once it is far enough
            state = self.run("systemctl", "is-system-running").stdout.strip()

    def run(self, *command: str, check: bool = False, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        """``command`` as root in the container (every namespace of its PID 1)."""
        if self.leader is None:
            raise BoxError("the container is not booted")
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *command],
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def inside(self, path: str) -> Path:
        """``path`` as the container's PID 1 sees it (its mounts included), from here."""
        return Path(f"/proc/{self.leader}/root{path}")

    def mount_entry(self, path: str) -> tuple[str, str, str] | None:
        """(fstype, source, major:minor) of the topmost mount at ``path`` in the namespace of
        the container's PID 1, i.e. what every process outside a service sees."""
        found = None
        with open(f"/proc/{self.leader}/mountinfo") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                if fields[4] == path:
                    separator = fields.index("-")
                    found = (fields[separator + 1], fields[separator + 2], fields[2])
        return found

    def stop(self) -> None:
        """Power off (SIGKILL for nspawn if that hangs), then unmount the overlay."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.leader is not None:
                subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl",
                                "poweroff", "--no-block"], capture_output=True, timeout=30)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        self.leader = None
        for mountpoint in (self.root, self.layer):
            if os.path.ismount(mountpoint):
                if subprocess.run(["umount", str(mountpoint)],
                                  capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def _child_named(pid: int, name: str) -> int | None:
    """The pid of a child of ``pid`` whose command is ``name``."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == name:
                return int(child)
        except FileNotFoundError:
            continue
    return None


def can_boot() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh installs it)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists(SERVICE_PYTHON):
        return f"{SERVICE_PYTHON} is missing"
    return None


if __name__ == "__main__":  # manual exploration: python tests/service/harness.py DIR
    box = SystemdBox(Path(sys.argv[1]))
    box.prepare()
    box.install_razorfs(service_venv())
    box.boot()
    print(f"booted: nsenter -t {box.leader} -a bash   (stop: kill {box.nspawn.pid})")
