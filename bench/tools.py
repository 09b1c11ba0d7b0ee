"""The one way bench/ gets what it runs: Debian's fio, fsmark and dbench, the C anchor
(libfuse's passthrough_hp, built from Debian's fuse3 source package against the installed
libfuse3-dev) and the source tarball of the tree workloads.

    .venv/bin/python bench/tools.py            # install and build everything, print what is where

Nothing of it is committed: the anchor and the tarball are built into the cache directory
(RAZORFS_BENCH_CACHE, default ~/.cache/razorfs-bench). Source packages come through a private
apt configuration in that cache holding a deb-src line for each Debian source the machine's
own apt uses for its release, so the machine's apt setup is left as it was.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

CACHE = os.environ.get("RAZORFS_BENCH_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "razorfs-bench"))
PACKAGES = {"fio": "fio", "fs_mark": "fsmark", "dbench": "dbench"}
TREE_PACKAGE = "git"  # its upstream source: ~4,500 entries, ~45 MB, a real source tree
ANCHOR_FLAGS = ("--foreground",)  # libfuse defaults: threads, splice, writeback cache, 1 day timeouts
# what fuse3's meson build finds on Linux; without them times, xattrs and fallocate answer
# EOPNOTSUPP or ENOSYS
ANCHOR_DEFINES = ("-DHAVE_UTIMENSAT", "-DHAVE_SETXATTR", "-DHAVE_POSIX_FALLOCATE")
ANCHOR_BUILD = ("g++", "-std=c++17", "-O2", *ANCHOR_DEFINES)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class ToolMissing(Exception):
    """A tool is not here and may not or cannot be installed; the reason is the message."""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, **kwargs)
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-4:])
        raise ToolMissing(f"{' '.join(command[:3])} ... failed: {tail}")
    return result


class Tools:
    """Finds each tool, and installs or builds it once when ``install`` allows."""

    def __init__(self, install: bool) -> None:
        self.install = install
        self.missing: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self._apt_updated = False

    def binary(self, name: str) -> str | None:
        """fio, fs_mark or dbench on PATH (installed from Debian if allowed), else None."""
        if name in self.missing:
            return None
        path = shutil.which(name)
        try:
            if path is None:
                self._need_install(f"{name} (Debian package {PACKAGES[name]})")
                self._apt_install(PACKAGES[name])
                path = shutil.which(name)
                if path is None:
                    raise ToolMissing(f"{PACKAGES[name]} installed no {name}")
        except ToolMissing as exc:
            return self._skip(name, exc)
        self.versions.setdefault(name, _dpkg_version(PACKAGES[name]))
        return path

    def anchor(self) -> str | None:
        """libfuse's passthrough_hp, built from Debian's fuse3 source for the installed
        libfuse3-dev."""
        if "anchor" in self.missing:
            return None
        version = _dpkg_version("libfuse3-dev")
        recipe = hashlib.sha256(" ".join(ANCHOR_BUILD).encode()).hexdigest()[:8]
        binary = os.path.join(CACHE, f"passthrough_hp-{version}-{recipe}")
        try:
            if not os.access(binary, os.X_OK):
                self._need_install(f"passthrough_hp for libfuse3-dev {version or '(absent)'}")
                self._build_anchor(version, binary)
        except ToolMissing as exc:
            return self._skip("anchor", exc)
        self.versions["passthrough_hp"] = f"fuse3 {version}, flags {' '.join(ANCHOR_FLAGS)}"
        return binary

    def tree_tarball(self) -> str | None:
        """The upstream tarball of Debian's git source package, uncompressed (so that extracting
        it measures the filesystem, not xz)."""
        if "tree" in self.missing:
            return None
        found = sorted(glob.glob(os.path.join(CACHE, f"{TREE_PACKAGE}_*.orig.tar")))
        try:
            if not found:
                self._need_install(f"the {TREE_PACKAGE} source tarball")
                found = [self._fetch_tarball()]
        except ToolMissing as exc:
            return self._skip("tree", exc)
        self.versions["tree"] = os.path.basename(found[-1])
        return found[-1]

    def all(self) -> None:
        for name in PACKAGES:
            self.binary(name)
        self.anchor()
        self.tree_tarball()

    # ---- installing ----

    def _need_install(self, what: str) -> None:
        if not self.install:
            raise ToolMissing(f"{what} is not installed (--no-install)")
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ToolMissing(f"{what} is not installed; installing needs root and apt-get")
        log(f"installing {what}")

    def _skip(self, name: str, exc: ToolMissing) -> None:
        self.missing[name] = str(exc)
        log(f"SKIPPING what needs {name}: {exc}")
        return None

    def _apt_install(self, package: str) -> None:
        if not self._apt_updated:
            _run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"])
            self._apt_updated = True
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
              "-o", "DPkg::Lock::Timeout=300", package])

    def _apt_source(self, *arguments: str, cwd: str) -> None:
        """apt-get source through the cache's own apt configuration (deb-src lines only)."""
        root = os.path.join(CACHE, "apt")
        options = ["-o", f"Dir::Etc::SourceList={root}/sources.list",
                   "-o", f"Dir::Etc::SourceParts={root}/sources.list.d",
                   "-o", f"Dir::State::Lists={root}/lists", "-o", f"Dir::Cache={root}/cache"]
        if not os.path.exists(os.path.join(root, "sources.list")):
            for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
                os.makedirs(os.path.join(root, sub), exist_ok=True)
            lines = deb_src_lines()
            if not lines:
                raise ToolMissing("no Debian source of this release found in /etc/apt")
            with open(os.path.join(root, "sources.list"), "w") as out:
                out.write("\n".join(lines) + "\n")
            _run(["apt-get", "-q", *options, "update"])
        _run(["apt-get", "-q", *options, "source", *arguments], cwd=cwd)

    def _build_anchor(self, version: str, binary: str) -> None:
        if not version:
            raise ToolMissing("libfuse3-dev is not installed (scripts/install.sh installs it)")
        if shutil.which("g++") is None:
            self._apt_install("g++")
        work = os.path.join(CACHE, "fuse3-source")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        self._apt_source(f"fuse3={version}", cwd=work)
        sources = glob.glob(os.path.join(work, "fuse3-*", "example", "passthrough_hp.cc"))
        if not sources:
            raise ToolMissing("fuse3's source package has no example/passthrough_hp.cc")
        flags = _run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
        # cxxopts.hpp sits next to passthrough_hp.cc in the example directory
        _run([*ANCHOR_BUILD, "-o", binary + ".new", sources[0], *flags, "-pthread"])
        os.replace(binary + ".new", binary)
        shutil.rmtree(work)

    def _fetch_tarball(self) -> str:
        work = os.path.join(CACHE, "tree-source")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        self._apt_source("--download-only", TREE_PACKAGE, cwd=work)
        packed = glob.glob(os.path.join(work, f"{TREE_PACKAGE}_*.orig.tar.*"))
        if len(packed) != 1:
            raise ToolMissing(f"expected one upstream tarball of {TREE_PACKAGE}, got {packed}")
        tarball = os.path.join(CACHE, os.path.basename(packed[0]).rsplit(".", 1)[0])
        with open(tarball + ".new", "wb") as out:
            subprocess.run(["xz" if packed[0].endswith(".xz") else "gzip", "-dc", packed[0]],
                           stdout=out, check=True)
        os.replace(tarball + ".new", tarball)
        shutil.rmtree(work)
        return tarball


def deb_src_lines() -> list[str]:
    """One-line deb-src entries for the Debian archives the machine's apt uses for its own
    release (the suite named after the release codename), from sources.list and *.sources."""
    codename = _os_release().get("VERSION_CODENAME", "")
    entries: list[tuple[str, str, str, str]] = []  # (options, uri, suite, components)
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    for path in files:
        for line in _read_lines(path):
            match = re.match(r"deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)", line)
            if match:
                entries.append((match.group(1) or "", *match.group(2, 3, 4)))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in "\n".join(_read_lines(path, keep_blank=True)).split("\n\n"):
            fields = dict(re.findall(r"^(\S+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
                continue
            keyring = fields.get("Signed-By", "")
            options = f"[signed-by={keyring}] " if keyring.startswith("/") else ""
            for uri in fields.get("URIs", "").split():
                for suite in fields.get("Suites", "").split():
                    entries.append((options, uri, suite, fields.get("Components", "main")))
    return [f"deb-src {options}{uri} {suite} {components}"
            for options, uri, suite, components in entries
            if suite == codename or suite.startswith(codename + "-")]


def _read_lines(path: str, keep_blank: bool = False) -> list[str]:
    """Lines without comments; whole-line comments vanish, so blank lines (stanza breaks in
    deb822 files) are only the real ones."""
    try:
        with open(path) as source:
            lines = [line.split("#", 1)[0].rstrip() for line in source
                     if not line.lstrip().startswith("#")]
    except OSError:
        return []
    return [line for line in lines if keep_blank or line.strip()]


def _os_release() -> dict[str, str]:
    return dict(line.strip().split("=", 1) for line in _read_lines("/etc/os-release")
                if "=" in line)


def _dpkg_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def main() -> int:
    tools = Tools(install=True)
    tools.all()
    for name, version in tools.versions.items():
        print(f"{name}: {version}")
    for name, reason in tools.missing.items():
        print(f"MISSING {name}: {reason}")
    return 1 if tools.missing else 0


if __name__ == "__main__":
    sys.exit(main())
