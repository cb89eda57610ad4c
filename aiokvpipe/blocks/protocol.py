"""Control messages of a block connection, and the order they come in.

No pickle: a message is a 16-byte header, a JSON object and an array of
block ids (little-endian u32)::

    0   magic     4s   b"AKVB"
    4   version   u8
    5   kind      u8   REQUEST / REPLY / STATUS / SETUP
    6   reserved  u16  0
    8   json_len  u32  <= MAX_JSON
    12  nids      u32  <= MAX_IDS (REQUEST only)

Every field is checked before it is trusted; anything off is a
:class:`ProtocolError`, and the side that sees it closes the connection.

One transfer on a connection (the requester dialled the owner)::

    read:  REQUEST -> REPLY(ok, nbytes) <- payload <- STATUS(ok|error) <- STATUS(done|abort) ->
    write: REQUEST -> REPLY(ok, nbytes) <- payload -> STATUS(commit|abort) -> STATUS(landed|...) <-

A write may go *pipelined* (``pipelined: true`` in its REQUEST): the
requester sends REQUEST, payload and its verdict without waiting, and the
owner answers once, at the end::

    write: REQUEST(pipelined) -> payload -> STATUS(commit|abort) ->  STATUS(landed|...) <-

so the next write on the connection may follow at once; the answers come
back in the order the writes were sent. An owner that refuses such a write
has already been sent its payload: it reads it into scratch memory (never
into a block) and answers STATUS(error). It does so only for a payload it
can bound -- exactly what the REQUEST's own layouts say its blocks hold,
and no more than the owner's largest region -- and cuts the requester off
(:class:`ProtocolError`) otherwise. Requesters pipeline only the writes that
follow one the owner accepted on the same connection, for the same request
and region (see :mod:`aiokvpipe.blocks.service`).

GPU regions on one host may skip the payload (:mod:`aiokvpipe.blocks.gpu`):
a REQUEST naming the owner's IPC export (``ipc``) may be answered
REPLY(ok, path=ipc); the requester then copies through its mapping and::

    read:  ... STATUS(done|abort) -> STATUS(ok|aborted|error) <-
    write: ... STATUS(commit|abort) -> STATUS(landed|aborted|error) <-

GPU regions on two hosts may move the runs with NCCL instead
(:mod:`aiokvpipe.blocks.ncclpath`): the REQUEST carries the run lengths
(``nccl``), a REPLY(ok, path=nccl) agrees, both ends post their NCCL
operations, and the same STATUS pairs as for IPC follow. SETUP{nccl: 1}
messages build the connection's communicator first.

A requester maps the owner's region first with SETUP{ipc: 1, region,
request_id, first} messages, each answered with up to 32 tensor
descriptions (or an error: the requester then stages).

Between transfers the requester may send SETUP to move one direction's
payloads through a shared-memory ring from then on (same host only; see
:mod:`aiokvpipe.blocks.shmpath`). A refused REQUEST gets REPLY(error) and
the connection stays usable. The
REQUEST states the payload size the requester computed from its own blocks;
the owner cuts off a requester whose claim differs from what the granted
blocks hold, before any payload byte is read. The payload is the blocks'
bytes in stream order (:mod:`aiokvpipe.blocks.region`).
"""

from __future__ import annotations

import enum
import json
import math
import socket
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import (
    AiokvpipeError,
    BadMagicError,
    BlockError,
    BlockIdError,
    BlockShapeError,
    LeaseCancelledError,
    LeaseCompletedError,
    LeaseExpiredError,
    LeaseNotGrantedError,
    MalformedFrameError,
    PeerClosedError,
    ProtocolError,
    UnknownRegionError,
    UnsupportedVersionError,
)
from ..handshake import parse_control_message
from .region import TensorLayout, layout_from_wire
from .sgio import Segments, recv_segments, send_segments

MAGIC = b"AKVB"
VERSION = 1
_HEADER = struct.Struct("<4sBBHII")
MAX_JSON = 16 << 10
MAX_IDS = 1 << 20
MAX_NAME = 256
MAX_LAYERS = 4096
MAX_PAYLOAD = 1 << 50
#: Run lengths one NCCL REQUEST may carry (far below MAX_JSON); more runs stage.
MAX_NCCL_RUNS = 1024


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    STATUS = 3
    SETUP = 4


Op = Literal["read", "write"]


@dataclass(frozen=True)
class Message:
    kind: Kind
    body: dict[str, Any]
    ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Request:
    """A validated REQUEST: what the requester asks of the owner's memory."""

    op: Op
    request_id: str
    region: str
    layers: tuple[int, ...]
    layouts: tuple[TensorLayout, ...]
    nbytes: int
    blocks: tuple[int, ...]
    ipc: str | None = None  # the owner's export the requester mapped, if it would copy
    nccl: tuple[int, ...] | None = None  # run lengths, if it would move the runs by NCCL
    pipelined: bool = False  # a write whose payload follows without waiting for a REPLY

    def layouts_nbytes(self) -> int:
        """What the blocks hold by the REQUEST's own layouts (an honest ``nbytes``)."""
        return len(self.blocks) * sum(
            math.prod(layout.outer) * layout.block_bytes for layout in self.layouts
        )


# ------------------------------------------------------------------ framing


def encode(kind: Kind, body: dict[str, Any], ids: Sequence[int] = ()) -> bytes:
    text = json.dumps(body, separators=(",", ":")).encode()
    packed = array("I", ids)
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        packed.byteswap()
    return _HEADER.pack(MAGIC, VERSION, kind, 0, len(text), len(ids)) + text + packed.tobytes()


async def send_message(
    sock: socket.socket, kind: Kind, body: dict[str, Any], what: str, ids: Sequence[int] = ()
) -> None:
    await send_segments(sock, Segments([memoryview(encode(kind, body, ids))], receive=False), what)


async def _recv_exactly(sock: socket.socket, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    await recv_segments(sock, Segments([memoryview(buf)], receive=True), what)
    return buf


async def read_message(sock: socket.socket, what: str, eof_ok: bool = False) -> Message | None:
    """The next message; None on EOF before its first byte when ``eof_ok``."""
    head = bytearray(_HEADER.size)
    segs = Segments([memoryview(head)], receive=True)
    try:
        await recv_segments(sock, segs, what)
    except PeerClosedError:
        if eof_ok and segs.moved == 0:
            return None
        raise
    magic, version, kind, reserved, json_len, nids = _HEADER.unpack(head)
    if magic != MAGIC:
        raise BadMagicError(f"{what}: not a block message (magic {bytes(magic)!r})")
    if version != VERSION:
        raise UnsupportedVersionError(f"{what}: block protocol version {version}")
    if kind not in Kind._value2member_map_ or reserved:
        raise MalformedFrameError(f"{what}: unknown block message kind {kind}")
    if json_len > MAX_JSON:
        raise MalformedFrameError(f"{what}: control message of {json_len} bytes > {MAX_JSON}")
    if nids > MAX_IDS or (nids and kind != Kind.REQUEST):
        raise MalformedFrameError(f"{what}: {nids} block ids in a {Kind(kind).name} message")
    rest = await _recv_exactly(sock, json_len + 4 * nids, what)
    try:
        # The same hostile-JSON guards as every other control message.
        body = parse_control_message(bytes(rest[:json_len]), what)
    except ProtocolError as exc:
        raise MalformedFrameError(str(exc)) from exc
    ids = array("I")
    ids.frombytes(bytes(rest[json_len:]))
    if sys.byteorder != "little":  # pragma: no cover
        ids.byteswap()
    return Message(Kind(kind), body, tuple(ids))


async def expect_message(sock: socket.socket, kind: Kind, what: str) -> Message:
    message = await read_message(sock, what)
    assert message is not None
    if message.kind != kind:
        raise MalformedFrameError(f"{what}: expected {kind.name}, got {message.kind.name}")
    return message


# ------------------------------------------------------------------ field checks


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedFrameError(f"{what}: field {key!r} is missing or has the wrong type")
    return value


def _name(body: dict[str, Any], key: str, what: str) -> str:
    value: str = _field(body, key, str, what)
    if not value or len(value) > MAX_NAME:
        raise MalformedFrameError(f"{what}: field {key!r} must be 1..{MAX_NAME} characters")
    return value


def _count(body: dict[str, Any], key: str, what: str) -> int:
    value: int = _field(body, key, int, what)
    if not 0 <= value <= MAX_PAYLOAD:
        raise MalformedFrameError(f"{what}: field {key!r} = {value} out of range")
    return value


# ------------------------------------------------------------------ REQUEST


def request(
    op: Op,
    request_id: str,
    region: str,
    layers: Sequence[int],
    layouts: Sequence[TensorLayout],
    nbytes: int,
    blocks: Sequence[int],
    ipc: str | None = None,
    nccl: Sequence[int] | None = None,
    pipelined: bool = False,
) -> tuple[dict[str, Any], Sequence[int]]:
    body: dict[str, Any] = {
        "op": op,
        "request_id": request_id,
        "region": region,
        "layers": list(layers),
        "layouts": [layout.to_wire() for layout in layouts],
        "nbytes": nbytes,
    }
    if ipc is not None:
        body["ipc"] = ipc
    if nccl is not None:
        body["nccl"] = list(nccl)
    if pipelined:
        body["pipelined"] = True
    return body, blocks


def parse_request(message: Message, what: str) -> Request:
    if message.kind != Kind.REQUEST:
        raise MalformedFrameError(f"{what}: expected REQUEST, got {message.kind.name}")
    body = message.body
    op = body.get("op")
    if op not in ("read", "write"):
        raise MalformedFrameError(f"{what}: unknown operation {op!r}")
    layers = _field(body, "layers", list, what)
    layouts = _field(body, "layouts", list, what)
    if len(layers) > MAX_LAYERS or len(layouts) != len(layers):
        raise MalformedFrameError(f"{what}: {len(layers)} layers with {len(layouts)} layouts")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise MalformedFrameError(f"{what}: layers must be integers")
    ipc = body.get("ipc")
    if ipc is not None and (not isinstance(ipc, str) or not 0 < len(ipc) <= 64):
        raise MalformedFrameError(f"{what}: field 'ipc' must name an export")
    nccl = body.get("nccl")
    if nccl is not None:
        nccl = _run_counts(nccl, len(message.ids), what)
    pipelined = body.get("pipelined", False)
    if not isinstance(pipelined, bool):
        raise MalformedFrameError(f"{what}: field 'pipelined' must be a bool")
    if pipelined and (op != "write" or ipc is not None or nccl is not None):
        # Only a payload on the stream can follow its REQUEST unasked.
        raise MalformedFrameError(f"{what}: only a write on the stream may be pipelined")
    try:
        parsed = tuple(layout_from_wire(obj) for obj in layouts)
    except ValueError as exc:
        raise MalformedFrameError(f"{what}: bad layout: {exc}") from exc
    return Request(
        op=op,
        request_id=_name(body, "request_id", what),
        region=_name(body, "region", what),
        layers=tuple(layers),
        layouts=parsed,
        nbytes=_count(body, "nbytes", what),
        blocks=message.ids,
        ipc=ipc,
        nccl=nccl,
        pipelined=pipelined,
    )


def _run_counts(value: Any, nids: int, what: str) -> tuple[int, ...]:
    """The requester's run lengths for an NCCL transfer: positive, covering every id once."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_NCCL_RUNS:
        raise MalformedFrameError(f"{what}: field 'nccl' must list 1..{MAX_NCCL_RUNS} run lengths")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise MalformedFrameError(f"{what}: field 'nccl' holds a run length below 1")
    if sum(value) != nids:
        raise MalformedFrameError(
            f"{what}: NCCL runs of {sum(value)} blocks in all for a request of {nids} blocks"
        )
    return tuple(value)


# ------------------------------------------------------------------ errors on the wire

# Only these travel: a peer cannot make us raise anything else.
_REMOTE_ERRORS: dict[str, type[AiokvpipeError]] = {
    cls.__name__: cls
    for cls in (
        BlockIdError,
        BlockShapeError,
        UnknownRegionError,
        LeaseNotGrantedError,
        LeaseExpiredError,
        LeaseCompletedError,
        LeaseCancelledError,
        PeerClosedError,
    )
}


def error_body(exc: BaseException) -> dict[str, Any]:
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)[:2000]}
    if isinstance(exc, BlockIdError):
        body["argument"] = exc.argument
        body["values"] = [v for v in exc.values if isinstance(v, int)][:64]
    if isinstance(exc, UnknownRegionError):
        body["name"] = exc.name
    return body


def remote_error(body: dict[str, Any], peer: str) -> AiokvpipeError:
    """Rebuild the error the owner reported, prefixed with who reported it."""
    name = body.get("error")
    message = body.get("message")
    cls = _REMOTE_ERRORS.get(name) if isinstance(name, str) else None
    if cls is None or not isinstance(message, str):
        return MalformedFrameError(f"{peer}: reported an unknown error {name!r}")
    text = f"{peer}: {message}"
    error: AiokvpipeError
    if cls is BlockIdError:
        argument = body.get("argument")
        values = body.get("values")
        if not isinstance(argument, str) or not isinstance(values, list):
            return MalformedFrameError(f"{peer}: BlockIdError without argument/values")
        error = BlockIdError(argument, [v for v in values if isinstance(v, int)], "")
    elif cls is UnknownRegionError:
        region = body.get("name")
        error = UnknownRegionError(region if isinstance(region, str) else "?", peer)
    else:
        error = cls(text)
    error.args = (text,)
    return error


# ------------------------------------------------------------------ REPLY / STATUS


Path = Literal["stream", "ipc", "nccl"]


def reply_ok(nbytes: int, path: Path = "stream") -> dict[str, Any]:
    body: dict[str, Any] = {"ok": True, "nbytes": nbytes}
    if path != "stream":
        body["path"] = path
    return body


def reply_path(message: Message, what: str) -> Path:
    """How an agreed transfer moves: the payload on the stream, or copies through IPC."""
    path = message.body.get("path", "stream")
    if path == "ipc" or path == "nccl":
        return path  # type: ignore[no-any-return]
    if path != "stream":
        raise MalformedFrameError(f"{what}: unknown payload path {path!r}")
    return "stream"


def parse_reply(message: Message, peer: str, what: str) -> int:
    """The payload size the owner agreed to, or raise the error it reported."""
    if message.kind != Kind.REPLY:
        raise MalformedFrameError(f"{what}: expected REPLY, got {message.kind.name}")
    if message.body.get("ok") is True:
        return _count(message.body, "nbytes", what)
    raise remote_error(message.body, peer)


Status = Literal["ok", "done", "abort", "commit", "landed", "aborted", "error"]
_STATUSES = frozenset(("ok", "done", "abort", "commit", "landed", "aborted", "error"))


def status(value: Status, exc: BaseException | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"status": value}
    if exc is not None:
        body.update(error_body(exc))
    return body


def parse_status(message: Message, allowed: frozenset[str], what: str) -> str:
    if message.kind != Kind.STATUS:
        raise MalformedFrameError(f"{what}: expected STATUS, got {message.kind.name}")
    value = message.body.get("status")
    if value not in _STATUSES or value not in allowed:
        raise MalformedFrameError(f"{what}: unexpected status {value!r}")
    return str(value)


def status_error(message: Message, peer: str) -> BlockError | AiokvpipeError:
    return remote_error(message.body, peer)
