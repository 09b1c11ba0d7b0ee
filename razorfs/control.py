"""The control channel: ``razorfs stats`` talks to a running daemon.

A Unix stream socket in the abstract namespace, named after the data directory, so it needs no
file (nothing stale after a kill -9, no path-length limit, works under ProtectSystem=strict).
Abstract sockets have no permission bits, so every connection's peer credentials (SO_PEERCRED)
are checked: only root or the user the daemon runs as may ask. The client sends one request
line, a name and optional JSON arguments (``stats``; ``remount {"read_only": true, ...}``); the
daemon answers one JSON document and closes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from typing import Any, Awaitable, Callable

import structlog
import trio

log = structlog.get_logger("razorfs.control")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class ControlError(Exception):
    """The daemon could not be asked (not running, refused)."""


def control_address(data_dir: str) -> str:
    digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:32]
    return f"\0razorfs-{digest}"


Handler = Callable[..., Awaitable[dict]]


async def serve(data_dir: str, handlers: dict[str, Handler], *,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests ``{name: handler}``; a handler takes the request's JSON arguments as
    keywords and returns the answer."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(control_address(data_dir))
        listener.listen(8)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(_answer, connection, handlers)


async def _answer(connection, handlers: dict[str, Handler]) -> None:
    """Answer one client. A failure here is logged and never reaches the daemon's nursery:
    a misbehaving client must not take the mount down."""
    stream = trio.SocketStream(connection)
    try:
        async with stream:
            _, uid, _ = _PEERCRED.unpack(
                connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            with trio.move_on_after(5):
                # Read the request even from a refused peer: closing with unread data would
                # reset the connection before the client reads why.
                request = (await stream.receive_some(4096)).strip()
                if uid not in (0, os.getuid()):
                    log.warning("control request refused", peer_uid=uid)
                    answer = {"error": "permission denied"}
                else:
                    answer = await _dispatch(request, handlers)
                await stream.send_all(json.dumps(answer).encode())
    except Exception:
        log.exception("control request failed")


async def _dispatch(request: bytes, handlers: dict[str, Handler]) -> dict:
    name, _, arguments = request.decode(errors="replace").partition(" ")
    handler = handlers.get(name)
    if handler is None:
        return {"error": f"unknown request {request[:32]!r}"}
    try:
        keywords = json.loads(arguments) if arguments else {}
        if not isinstance(keywords, dict):
            raise ValueError("arguments must be a JSON object")
        return await handler(**keywords)
    except (ValueError, TypeError) as exc:
        return {"error": f"bad {name} request: {exc}"}


def query(data_dir: str, request: str = "stats", timeout: float = 10.0,
          **arguments: Any) -> dict:
    """Blocking client used by the CLI: ``request`` with ``arguments`` (sent as JSON)."""
    line = f"{request} {json.dumps(arguments)}" if arguments else request
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(control_address(data_dir))
        except (ConnectionRefusedError, FileNotFoundError):
            raise ControlError(f"no razorfs daemon is serving {data_dir}") from None
        client.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks))
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer
