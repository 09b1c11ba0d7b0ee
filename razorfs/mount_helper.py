"""``mount.fuse.razorfs``: lets mount(8) and /etc/fstab mount razorfs.

mount(8) runs ``/sbin/mount.fuse.razorfs DATA_DIR MOUNTPOINT [-o OPTIONS] [-s -f -n -v]`` for
``mount -t fuse.razorfs`` and for fstab lines of that type; link this script there (see README).
Standard options are mapped to ``razorfs mount`` flags; options that only mount(8) or systemd
read (``x-systemd.*``, ``_netdev``, ``nofail``, ``noauto``...) are ignored, as are options razorfs
always behaves by (``relatime``, ``rw``, ``dev``...).
razorfs's own: ``durability=fsync|sync``, ``commit_interval=SECONDS``, ``metrics=ADDRESS:PORT``,
``log_level=LEVEL``, ``replica=s3://BUCKET/PREFIX``, ``replica_retention=DURATION``; ``sync`` means ``durability=sync`` (every change durable before it returns).
"""

from __future__ import annotations

import argparse
import sys

from razorfs import cli

_FLAGS = {"allow_other": ["--allow-other"], "ro": ["--read-only"],
          "sync": ["--durability", "sync"], "noatime": ["--noatime"]}
_VALUES = {"durability": "--durability", "commit_interval": "--commit-interval",
           "metrics": "--metrics", "log_level": "--log-level", "replica": "--replica",
           "replica_retention": "--replica-retention"}
_IGNORED = {"rw", "defaults", "auto", "noauto", "user", "nouser", "users", "dev", "nodev",
            "suid", "nosuid", "exec", "noexec", "relatime", "atime", "nofail",
            "_netdev", "default_permissions", "async"}


def translate(data_dir: str, mountpoint: str, options: str) -> list[str]:
    """``razorfs mount`` arguments for a mount(8) option string."""
    arguments = ["mount", data_dir, mountpoint]
    for option in filter(None, options.split(",")):
        name, _, value = option.partition("=")
        if name in _FLAGS and not value:
            arguments += _FLAGS[name]
        elif name in _VALUES and value:
            arguments += [_VALUES[name], value]
        elif name in _IGNORED or name.startswith(("x-", "comment=")):
            continue
        else:
            raise SystemExit(f"mount.fuse.razorfs: unknown option {option!r}")
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mount.fuse.razorfs")
    parser.add_argument("data_dir")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", default="")
    parser.add_argument("-t", dest="fstype", default="fuse.razorfs")
    for flag in ("-s", "-f", "-n", "-v"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    return cli.main(translate(args.data_dir, args.mountpoint, args.options))


if __name__ == "__main__":
    sys.exit(main())
