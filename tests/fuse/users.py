"""Running one operation as an unprivileged user, for permission tests over real mounts."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path


def run_as(uid: int, gid: int, cwd: Path, func, groups: tuple[int, ...] = ()):
    """``func()`` in a forked child that entered ``cwd`` and dropped root for uid/gid (with the
    supplementary ``groups``): ``("ok", value)`` or the errno name of the OSError it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.chdir(cwd)  # before dropping root: no directory above needs to be searchable
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result = ("ok", func())
            except OSError as exc:
                result = errno.errorcode.get(exc.errno, str(exc.errno))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(result, out)
        except BaseException:  # noqa: BLE001 - any failure: a non-zero exit, never pytest
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"child as uid {uid} failed"
    return pickle.loads(data)
