"""Control messages over a raw socket, and the token handshake.

Shared by rendezvous and by transports that talk over their link socket
during set-up (shm, NCCL, CUDA IPC). Everything is awaited through
``loop.sock_*`` calls, which asyncio and uvloop both support on plain
non-blocking sockets.

Control messages are a 4-byte little-endian length and a JSON object of at
most 64 KiB: never pickle, so a peer can send nothing but data.

The token handshake (mutual, HMAC-SHA256, nothing but nonces on the wire)::

    acceptor  -> connector : b"AKVH" ver flags nonce_a[32]
    connector -> acceptor  : b"AKVC" ver flags nonce_c[32] mac_c[32]
    acceptor  -> connector : verdict[1] mac_a[32]

``mac_c = HMAC(token, "client" | nonce_a | nonce_c)`` and
``mac_a = HMAC(token, "server" | nonce_c | nonce_a)``. Without a token the
MACs are zero. A failing connector is told ``verdict=0`` and dropped before
any frame is read; it raises :class:`AuthenticationError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import socket
import struct
from typing import Any

from .errors import (
    AuthenticationError,
    BadMagicError,
    PeerClosedError,
    ProtocolError,
    UnsupportedVersionError,
)

HANDSHAKE_VERSION = 1
_HELLO = struct.Struct("<4sBB32s")
_RESPONSE = struct.Struct("<4sBB32s32s")
_VERDICT = struct.Struct("<B32s")
_FLAG_TOKEN = 1
_LEN = struct.Struct("<I")
MAX_CONTROL_MESSAGE = 64 * 1024


# --------------------------------------------------------------------- io helpers


async def recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    """Read exactly ``n`` bytes or raise PeerClosedError naming ``what``."""
    loop = asyncio.get_running_loop()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = await loop.sock_recv_into(sock, view[got:])
        except OSError as exc:
            raise PeerClosedError(f"{what}: connection failed: {exc}") from exc
        if k == 0:
            raise PeerClosedError(f"{what}: peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)


async def send_all(sock: socket.socket, data: bytes, what: str) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except OSError as exc:
        raise PeerClosedError(f"{what}: connection failed: {exc}") from exc


async def send_message(sock: socket.socket, payload: dict[str, Any], what: str) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send_all(sock, _LEN.pack(len(body)) + body, what)


async def recv_message(sock: socket.socket, what: str) -> dict[str, Any]:
    (length,) = _LEN.unpack(await recv_exactly(sock, _LEN.size, what))
    if length > MAX_CONTROL_MESSAGE:
        raise ProtocolError(
            f"{what}: control message of {length} bytes exceeds {MAX_CONTROL_MESSAGE}"
        )
    return parse_control_message(await recv_exactly(sock, length, what), what)


def parse_control_message(body: bytes, what: str) -> dict[str, Any]:
    """Decode one control message; anything but a plain JSON object is a ProtocolError.

    A peer that proved the token may still be hostile or broken, and ``json``
    raises more than JSONDecodeError on such input: RecursionError for deep
    nesting, ValueError past the int digit limit. Some input parses but
    breaks whoever trusts it later, so it is refused here too: NaN and
    infinities (``int(inf)`` raises OverflowError), lone surrogates (``.encode()``
    raises) and duplicate keys (parsers disagree on which one wins).
    """
    try:
        payload = json.loads(
            body,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        if not isinstance(payload, dict):
            raise ProtocolError(f"{what}: control message is not an object")
        _check_strings(payload)
    except (ValueError, RecursionError, OverflowError) as exc:
        # ValueError covers JSONDecodeError and UnicodeDecodeError too.
        raise ProtocolError(
            f"{what}: control message is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
        ) from exc
    return payload


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}... is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate keys in an object")
    return result


def _check_strings(payload: dict[str, Any]) -> None:
    """Every key and string encodes as UTF-8 (no lone surrogates); iterative,
    so a message nested as deep as json allows cannot overflow the stack."""
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            item.encode()  # UnicodeEncodeError (a ValueError) for a lone surrogate


# --------------------------------------------------------------------- handshake


def _mac(token: bytes | None, label: bytes, a: bytes, b: bytes) -> bytes:
    if token is None:
        return bytes(32)
    return hmac.new(token, label + a + b, hashlib.sha256).digest()


async def authenticate_acceptor(sock: socket.socket, token: bytes | None, what: str) -> None:
    """Acceptor side of the handshake; raises AuthenticationError on failure."""
    nonce_a = secrets.token_bytes(32)
    flags = _FLAG_TOKEN if token is not None else 0
    await send_all(sock, _HELLO.pack(b"AKVH", HANDSHAKE_VERSION, flags, nonce_a), what)
    raw = await recv_exactly(sock, _RESPONSE.size, what)
    magic, version, _cflags, nonce_c, mac_c = _RESPONSE.unpack(raw)
    if magic != b"AKVC":
        raise BadMagicError(f"{what}: connector did not speak the aiokvpipe handshake")
    if version != HANDSHAKE_VERSION:
        raise UnsupportedVersionError(f"{what}: handshake version {version}")
    ok = hmac.compare_digest(mac_c, _mac(token, b"client", nonce_a, nonce_c))
    mac_a = _mac(token, b"server", nonce_c, nonce_a) if ok else bytes(32)
    await send_all(sock, _VERDICT.pack(1 if ok else 0, mac_a), what)
    if not ok:
        raise AuthenticationError(f"{what}: connector failed to prove the token")


async def authenticate_connector(sock: socket.socket, token: bytes | None, what: str) -> None:
    """Connector side; raises AuthenticationError if either side lacks the token."""
    raw = await recv_exactly(sock, _HELLO.size, what)
    magic, version, flags, nonce_a = _HELLO.unpack(raw)
    if magic != b"AKVH":
        raise BadMagicError(f"{what}: {sock.getpeername()} is not an aiokvpipe endpoint")
    if version != HANDSHAKE_VERSION:
        raise UnsupportedVersionError(f"{what}: handshake version {version}")
    peer_wants_token = bool(flags & _FLAG_TOKEN)
    nonce_c = secrets.token_bytes(32)
    await send_all(
        sock,
        _RESPONSE.pack(
            b"AKVC", HANDSHAKE_VERSION, 0, nonce_c, _mac(token, b"client", nonce_a, nonce_c)
        ),
        what,
    )
    try:
        verdict, mac_a = _VERDICT.unpack(await recv_exactly(sock, _VERDICT.size, what))
    except PeerClosedError as exc:
        raise AuthenticationError(
            f"{what}: peer dropped the connection during the handshake"
        ) from exc
    if not verdict:
        if token is None and peer_wants_token:
            raise AuthenticationError(f"{what}: peer requires a token and none is configured")
        raise AuthenticationError(f"{what}: peer rejected our token")
    if token is not None and not peer_wants_token:
        raise AuthenticationError(
            f"{what}: a token is configured but the peer does not require one"
        )
    if not hmac.compare_digest(mac_a, _mac(token, b"server", nonce_c, nonce_a)):
        raise AuthenticationError(f"{what}: peer failed to prove the token")
