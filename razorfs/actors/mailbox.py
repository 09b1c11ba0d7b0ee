"""Addresses of actors, and the request/reply envelope.

An actor's inbox is a bounded trio memory channel of ``Envelope``s. ``Mailbox.ask`` sends the
encoded message with a one-shot reply channel and waits; a ``Failed`` reply is raised in the
caller as ``FsError``. ``Mailbox.tell`` sends without a reply. Closing a mailbox (every clone of
its send side) is how an actor is told to shut down.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import structlog
import trio

from razorfs.actors import messages
from razorfs.errors import FsError

log = structlog.get_logger("razorfs.mailbox")

INBOX_CAPACITY = 1024


class ReplySlot:
    """A one-shot reply channel: one ``put`` by the actor, one ``receive`` by the asker.

    Lighter than a one-item memory channel (no buffer, no clone bookkeeping), which matters
    because every request to an actor makes one."""

    __slots__ = ("_event", "_payload")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._payload: bytes | None = None

    def put(self, payload: bytes) -> None:
        if self._event.is_set():
            raise RuntimeError("a reply slot takes one reply")
        self._payload = payload
        self._event.set()

    async def receive(self) -> bytes:
        await self._event.wait()
        return self._payload


@dataclass(frozen=True, slots=True)
class Envelope:
    payload: bytes
    reply_to: ReplySlot | None


class Mailbox:
    def __init__(self, send_channel: trio.MemorySendChannel) -> None:
        self._send = send_channel

    async def ask(self, message) -> messages.Ok:
        slot = ReplySlot()
        try:
            await self._post(Envelope(messages.encode(message), slot))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise FsError(errno.EIO, f"{type(message).__name__}: actor stopped") from None
        reply = messages.decode(await slot.receive())
        if isinstance(reply, messages.Failed):
            raise FsError(reply.errno, reply.message)
        return reply

    async def tell(self, message) -> None:
        await self._post(Envelope(messages.encode(message), None))

    async def _post(self, envelope: Envelope) -> None:
        """Into the inbox without a scheduling point when it has room: ``send`` always yields
        to the scheduler (trio's fairness checkpoint), which cost a full pass of the run loop
        per message. The asker yields anyway while it waits for the reply, and every actor
        yields once per message it takes, so nobody is starved. A full inbox still waits."""
        try:
            self._send.send_nowait(envelope)
        except trio.WouldBlock:
            await self._send.send(envelope)

    def clone(self) -> Mailbox:
        return Mailbox(self._send.clone())

    async def aclose(self) -> None:
        await self._send.aclose()

    async def __aenter__(self) -> Mailbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def open_mailbox(capacity: int = INBOX_CAPACITY) -> tuple[Mailbox, trio.MemoryReceiveChannel]:
    send, receive = trio.open_memory_channel(capacity)
    return Mailbox(send), receive


Handler = Callable[[Any], Awaitable[Any]]


def reply(envelope: Envelope, result: messages.Ok | messages.Failed) -> None:
    if envelope.reply_to is not None:
        envelope.reply_to.put(messages.encode(result))


async def handle_envelope(envelope: Envelope, handler: Handler, actor: str) -> None:
    """Decode, dispatch, reply. Domain errors become a Failed reply; so do unexpected ones
    (logged with traceback) so that one bad request never stops the actor. Handlers that can
    leave state half-changed must protect themselves (the tree manager goes failsafe)."""
    message = messages.decode(envelope.payload)
    try:
        value = await handler(message)
    except FsError as exc:
        reply(envelope, messages.Failed(exc.errno, exc.message))
        return
    except Exception:
        log.exception("unexpected error in actor", actor=actor, message=type(message).__name__)
        reply(envelope, messages.Failed(errno.EIO, f"internal error in {actor}"))
        return
    reply(envelope, value if isinstance(value, messages.Ok) else messages.Ok(value))
