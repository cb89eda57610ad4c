"""Control messages from an authenticated but hostile peer (issue 15, defect 8).

A peer that proved the token can still send any bytes as a control message
(a compromised or buggy rank). Whatever ``json`` raises on them -
RecursionError for deep nesting, ValueError for huge integers, ... - must
surface as a ProtocolError naming the link, never as a stray built-in error
that a listener or set-up path does not expect. Real sockets (a socketpair).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator

import pytest

from aiokvpipe import ProtocolError
from aiokvpipe.handshake import MAX_CONTROL_MESSAGE, recv_message, send_message

HOSTILE: list[tuple[str, bytes]] = [
    ("deep-array", b"[" * 60_000),  # RecursionError in the C decoder
    ("deep-object", b'{"a":' * 10_000),  # RecursionError too
    ("deep-closed", b'{"a":' + b"[" * 5_000 + b"]" * 5_000 + b"}"),
    ("huge-int", b'{"port":' + b"9" * 5_000 + b"}"),  # ValueError: int digit limit
    ("infinity", b'{"port":1e999}'),  # parses to inf: int(inf) -> OverflowError later
    ("nan", b'{"rank":NaN}'),
    ("minus-infinity", b'{"rank":-Infinity}'),
    ("float-many-digits", b'{"size":' + b"1" * 5_000 + b".5}"),  # inf as well
    ("lone-surrogate", b'{"host":"\\ud800"}'),  # breaks .encode() wherever it is used
    ("surrogate-key", b'{"\\udfff":1}'),
    ("duplicate-key", b'{"rank":1,"rank":0}'),  # two parsers may read it differently
    ("bad-utf8", b'{"a":"\xff"}'),
    ("not-json", b"\x00\x01\x02"),
    ("empty", b""),
    ("array", b"[1,2,3]"),
    ("string", b'"hello"'),
]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", [name for name, _ in HOSTILE])
async def test_hostile_control_message_is_a_protocol_error(
    case: str, pair: tuple[socket.socket, socket.socket]
) -> None:
    body = dict(HOSTILE)[case]
    assert len(body) <= MAX_CONTROL_MESSAGE
    ours, theirs = pair
    await asyncio.get_running_loop().sock_sendall(theirs, struct.pack("<I", len(body)) + body)
    with pytest.raises(ProtocolError, match="rank 0 <- rank 1") as info:
        await asyncio.wait_for(recv_message(ours, "rank 0 <- rank 1"), 5)
    assert isinstance(info.value.__cause__, Exception) or case in ("array", "string")


@pytest.mark.timeout(10)
async def test_well_formed_control_messages_still_round_trip(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    messages = [
        {"rank": 1, "port": 65535, "host": "127.0.0.1", "ok": True, "none": None},
        {"size": 1.5, "ids": [1, 2, 3], "nested": {"a": [{"b": []}]}, "text": "é€😀"},
        {"big": 2**63 - 1, "neg": -(2**63), "zero": 0.0},
        {"deep": json.loads("[" * 50 + "]" * 50)},  # modest nesting is fine
    ]
    for message in messages:
        await send_message(theirs, message, "test")
        assert await asyncio.wait_for(recv_message(ours, "test"), 5) == message
