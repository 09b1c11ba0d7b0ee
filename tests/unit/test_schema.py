"""The two schemas: redo operations (on-disk, in the WAL) and what actors say to each other."""

import msgpack
import pytest

from razorfs.actors import messages as m
from razorfs.state import redo
from razorfs.state.redo import SchemaError
from razorfs.state.tree import Attr

REG = 0o100644


def sample(annotation: str, index: int):
    return {
        "int": 1000 + index,
        "bytes": b"name\x00\xff%d" % index,
        "bool": True,
        "str": f"reason {index} \u00e9",
        "str | None": f"failed {index}",
        "float": 0.25 + index,
        "tuple": (index, 2**40, 0xFFFFFFFF),
        "int | None": 5 + index,
        "tuple | None": (index, 8, 0),
        "Attr": Attr(index, REG, 1, 2, 3, 0, 4096, 8, 10, 20, 30),
        "dict": {"lag_lsns": index, "state": "caught up", "refused": None},
    }[annotation]


def filled(cls):
    return cls(*(sample(cls.__annotations__[name], i) for i, name in enumerate(cls._fields)))


@pytest.mark.parametrize("cls", m.MESSAGES, ids=lambda cls: cls.__name__)
def test_every_message_roundtrips(cls) -> None:
    message = filled(cls)
    data = m.encode(message)
    assert msgpack.unpackb(data)[0] == cls.TAG
    decoded = m.decode(data)
    assert type(decoded) is cls and decoded == message


def test_a_changed_reply_gives_back_named_attributes() -> None:
    reply = m.decode(m.encode(filled(m.Changed)))
    assert type(reply.attr) is Attr and reply.attr.size == 4096


def test_messages_with_default_fields_roundtrip() -> None:
    for message in (m.SetAttr(4), m.SetAttr(4, size=0, tail=(0, 9, 123)),
                    m.MakeNode(1, b"n", REG, 0, 0, 0), m.Done(), m.Committed(17),
                    m.Failed(5, "EIO")):
        assert m.decode(m.encode(message)) == message


def test_tags_are_grouped_by_receiver_and_replies_apart() -> None:
    redo_tags = {cls.TAG for cls in redo.REDO_OPS}
    message_tags = {cls.TAG for cls in m.MESSAGES}
    assert max(redo_tags) < 50 and not redo_tags & message_tags
    assert [cls.TAG for cls in m.MESSAGES] == sorted(cls.TAG for cls in m.MESSAGES)


def test_redo_ops_roundtrip_as_one_payload() -> None:
    ops = [filled(cls) for cls in redo.REDO_OPS]
    assert redo.decode_ops(redo.encode_ops(ops)) == ops
    assert redo.decode_ops(redo.encode_ops([])) == []


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",                                   # a byte msgpack never uses
    msgpack.packb([81, 2, 3])[:-1],            # cut short
    msgpack.packb([81, 5]) + b"\x00",          # trailing bytes
    msgpack.packb(5),                          # not an array
    msgpack.packb([]),                         # no tag
    msgpack.packb([9999, 1]),                  # unknown tag
    msgpack.packb(["WaitDurable", 1]),         # a tag that is not a number
    msgpack.packb([81]),                       # WaitDurable without its field
    msgpack.packb([81, 5, 6]),                 # WaitDurable with one field too many
    msgpack.packb([2, 5]),                     # a redo operation is not a message
], ids=["empty", "invalid-byte", "truncated", "extra-data", "not-array", "no-tag",
        "unknown-tag", "string-tag", "missing-field", "extra-field", "redo-tag"])
def test_decode_of_garbage_raises_schema_error(data) -> None:
    with pytest.raises(SchemaError):
        m.decode(data)


def test_unknown_tag_is_named_in_the_error() -> None:
    with pytest.raises(SchemaError, match="unknown record tag 9999"):
        m.decode(msgpack.packb([9999]))


def test_decode_of_a_map_tag_raises_schema_error() -> None:
    with pytest.raises(SchemaError):
        m.decode(msgpack.packb([{"tag": 1}, 2]))


def test_decode_ops_refuses_messages_that_are_not_redo_operations() -> None:
    payload = redo.encode_ops([redo.DropInode(3), m.Remove(1, b"x", False)])
    with pytest.raises(SchemaError, match="unknown record tag 52"):
        redo.decode_ops(payload)
    with pytest.raises(SchemaError):
        redo.decode_ops(redo.encode_ops([m.Committed(1)]))


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([[9999]]), msgpack.packb([7])],
                         ids=["invalid-byte", "unknown-tag", "op-not-array"])
def test_decode_ops_of_garbage_raises_schema_error(payload) -> None:
    with pytest.raises(SchemaError):
        redo.decode_ops(payload)


@pytest.mark.parametrize("payload", [msgpack.packb(5), msgpack.packb(None)], ids=["int", "nil"])
def test_decode_ops_of_a_scalar_payload_raises_schema_error(payload) -> None:
    with pytest.raises(SchemaError):
        redo.decode_ops(payload)
