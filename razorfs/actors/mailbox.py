"""Addresses of actors, the request/reply envelope, and the one way an actor dispatches.

An actor's inbox is a bounded trio memory channel of ``Envelope``s. ``Mailbox.ask`` sends the
encoded message with a one-shot reply slot and waits; a ``Failed`` reply is raised in the caller
as ``FsError``. ``Mailbox.tell`` sends without a reply. Closing a mailbox (every clone of its send
side) is how an actor is told to shut down.

Every actor keeps a handler table ``{message type: async method}`` and hands each envelope to
``dispatch``. A handler returns its reply record (None means ``Done``); a domain error it raises
goes back as ``Failed``. A request answered later than its handler returns (the WAL writer's
``WaitDurable``) has its handler wrapped in ``ReplyLater``: that handler gets the reply slot too.
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
    """A one-shot reply channel: one ``put`` by the actor, one ``receive`` by the asker (lighter
    than a one-item memory channel, and every request makes one)."""

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

    async def ask(self, message) -> Any:
        """The reply record to ``message``; a ``Failed`` reply is raised as FsError."""
        slot = ReplySlot()
        try:
            await self._post(Envelope(messages.encode(message), slot))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise FsError(errno.EIO, f"{type(message).__name__}: actor stopped") from None
        reply = messages.decode(await slot.receive())
        if type(reply) is messages.Failed:
            raise FsError(reply.errno, reply.message)
        return reply

    async def tell(self, message) -> None:
        await self._post(Envelope(messages.encode(message), None))

    def tell_nowait(self, message) -> bool:
        """Post ``message`` if the inbox has room (True); False leaves it unsent."""
        try:
            self._send.send_nowait(Envelope(messages.encode(message), None))
        except trio.WouldBlock:
            return False
        return True

    async def _post(self, envelope: Envelope) -> None:
        """Into the inbox without a scheduling point when it has room (trio's ``send`` always
        yields): the asker yields anyway while it waits for the reply, and every actor yields
        once per message it takes, so nobody is starved. A full inbox still waits."""
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


@dataclass(frozen=True, slots=True)
class ReplyLater:
    """A handler table entry whose handler answers through the slot it is given, when it can."""

    handler: Callable[[Any, ReplySlot | None], Awaitable[None]]


def answer(slot: ReplySlot | None, reply) -> None:
    if slot is not None:
        slot.put(messages.encode(reply))


async def dispatch(envelope: Envelope, handlers: dict[type, Handler | ReplyLater],
                   actor: str) -> None:
    """Decode, call the handler for the message's type, reply. Domain errors become a Failed
    reply; so do unexpected ones (logged with traceback), so that one bad request never stops
    the actor. Handlers that can leave state half-changed must protect themselves (the tree
    manager goes failsafe)."""
    message = messages.decode(envelope.payload)
    handler = handlers.get(type(message))
    try:
        if handler is None:
            raise TypeError(f"{actor} does not handle {type(message).__name__}")
        if type(handler) is ReplyLater:
            await handler.handler(message, envelope.reply_to)
            return
        reply = await handler(message)
    except FsError as exc:
        answer(envelope.reply_to, messages.Failed(exc.errno, exc.message))
        return
    except Exception:
        log.exception("unexpected error in actor", actor=actor, message=type(message).__name__)
        answer(envelope.reply_to, messages.Failed(errno.EIO, f"internal error in {actor}"))
        return
    answer(envelope.reply_to, messages.Done() if reply is None else reply)
