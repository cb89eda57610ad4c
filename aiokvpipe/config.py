"""PipeConfig and EndpointConfig: everything a Pipe or an Endpoint needs to
know, validated once at construction.

Both share the fields a transport reads (see
:class:`~aiokvpipe.transport.base.LinkConfig`) and one token policy: a
missing token is only accepted where nobody else can connect (loopback), or
when the user opts out explicitly with ``insecure=True``.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import ConfigError

Transport = Literal["auto", "tcp", "shm", "nccl", "cuda_ipc"]
TRANSPORTS: tuple[str, ...] = ("auto", "tcp", "shm", "nccl", "cuda_ipc")

DEFAULT_PORT = 29600
DEFAULT_BUFFER_BYTES = 1 << 30
#: A hostile or confused peer can announce any size. Unless the user sets
#: ``max_frame_bytes``, one frame may carry at most ``buffer_bytes`` plus this:
#: a tensor somewhat larger than the window still passes (it is accepted when
#: the window is empty), but one header cannot make a receiver allocate far
#: more than the memory its window already grants.
DEFAULT_FRAME_MARGIN = 256 << 20
#: Shorter tokens are refused: an HMAC key should not be guessable.
MIN_TOKEN_BYTES = 16
#: How long an accepted connection may take to prove the token and say hello.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class PipeConfig:
    """Configuration of one rank's end of a ring of pipes.

    ``host``/``port`` name rank 0's rendezvous endpoint (vLLM's
    ``kv_ip``/``kv_port``). Each rank listens for its predecessor on an
    ephemeral port of ``bind_host`` (default: ``host`` on rank 0, the local
    address that routes to rank 0 elsewhere) — never on all interfaces unless
    you ask for ``"0.0.0.0"`` yourself.

    ``anticipate``: a waiting ``recv`` learns the rhythm of arrivals and
    spins (yielding to the loop) through a short window around the next
    expected message instead of sleeping through it, since waking a sleeping
    process costs 70-150 us on a VM. It costs at most ~20% of a core while
    messages flow steadily and nothing when they stop (see
    :mod:`aiokvpipe.cadence`); ``False`` always parks.

    ``token`` (at least 16 bytes) is required unless ``host`` and
    ``bind_host`` are loopback addresses; ``insecure=True`` accepts
    ``token=None`` anywhere (anyone who can reach the port can join).
    ``handshake_timeout`` bounds how long an accepted connection may take to
    prove the token.

    ``max_frame_bytes``: the largest payload of one message, sent or
    received. By default ``buffer_bytes + DEFAULT_FRAME_MARGIN`` (256 MiB),
    so a peer cannot make this rank allocate much more than its window for
    one frame; set it to send (and accept) larger tensors, on both ends.
    ``with_changes(buffer_bytes=...)`` derives a default limit again, a
    chosen one is kept.
    """

    rank: int
    world_size: int = 2
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = "cpu"
    transport: Transport = "auto"
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    # None: derived at construction (see resolve_max_frame_bytes), so it
    # reads as an int once the config exists.
    max_frame_bytes: int = None  # type: ignore[assignment]
    connect_timeout: float = 30.0
    op_timeout: float | None = None
    close_timeout: float = 10.0
    token: str | bytes | None = field(default=None, repr=False)  # a secret: never printed
    bind_host: str | None = None
    anticipate: bool = True
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    insecure: bool = False
    _derived_frame_limit: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int(self.world_size, "world_size", minimum=2)
        _check_int(self.rank, "rank", minimum=0)
        if self.rank >= self.world_size:
            raise ConfigError("rank", f"{self.rank} is not below world_size={self.world_size}")
        _check_host(self.host, "host", optional=False)
        _check_host(self.bind_host, "bind_host", optional=True)
        check_link_fields(self)
        hosts = [self.host] if self.bind_host is None else [self.host, self.bind_host]
        check_token(self.token, hosts, self.insecure)

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def token_bytes(self) -> bytes | None:
        return token_bytes(self.token)

    def with_changes(self, **changes: Any) -> PipeConfig:
        """A copy with ``changes``; a derived ``max_frame_bytes`` is derived again."""
        return replace(self, **_rederive_frame_limit(self, changes))

    @classmethod
    def from_kv_transfer_config(
        cls, source: Mapping[str, Any] | Any, **overrides: Any
    ) -> PipeConfig:
        """Build from vLLM's ``KVTransferConfig`` (an object or a dict).

        Maps ``kv_rank``, ``kv_parallel_size``, ``kv_ip``, ``kv_port``,
        ``kv_buffer_size`` and ``kv_buffer_device``; ``overrides`` win.
        """

        def get(name: str) -> Any:
            if isinstance(source, Mapping):
                return source.get(name)
            return getattr(source, name, None)

        mapping = {
            "kv_rank": "rank",
            "kv_parallel_size": "world_size",
            "kv_ip": "host",
            "kv_port": "port",
            "kv_buffer_size": "buffer_bytes",
            "kv_buffer_device": "device",
        }
        values: dict[str, Any] = {}
        for theirs, ours in mapping.items():
            value = get(theirs)
            if value is not None:
                values[ours] = value
        if isinstance(values.get("buffer_bytes"), float):
            size = values["buffer_bytes"]
            if not math.isfinite(size) or size != int(size):
                raise ConfigError("buffer_bytes", f"kv_buffer_size {size!r} is not a whole number")
            values["buffer_bytes"] = int(size)
        values.update(overrides)
        if "rank" not in values:
            raise ConfigError("rank", "kv_rank is missing from the KV transfer config")
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0], "is not a PipeConfig field")
        return cls(**values)


def token_bytes(token: str | bytes | None) -> bytes | None:
    if token is None:
        return None
    return token.encode() if isinstance(token, str) else token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: Any, hosts: list[str], insecure: Any) -> None:
    """The token policy of issue 15: a token of at least MIN_TOKEN_BYTES, or
    no token only on loopback, or no token anywhere with ``insecure=True``."""
    if not isinstance(insecure, bool):
        raise ConfigError("insecure", f"must be True or False, got {insecure!r}")
    if token is None:
        exposed = [h for h in hosts if not is_loopback(h)]
        if exposed and not insecure:
            raise ConfigError(
                "token",
                f"token=None on the non-loopback address {exposed[0]!r} lets anyone who can "
                f"reach it connect and receive tensors; set a token of at least "
                f"{MIN_TOKEN_BYTES} bytes (e.g. secrets.token_hex(16)), or insecure=True "
                "to accept that explicitly",
            )
        return
    if not isinstance(token, (str, bytes)):
        raise ConfigError("token", f"must be a str or bytes, or None, got {type(token).__name__}")
    size = len(token_bytes(token) or b"")
    if size < MIN_TOKEN_BYTES:
        raise ConfigError(
            "token", f"is {size} bytes; use at least {MIN_TOKEN_BYTES} (secrets.token_hex(16))"
        )


def check_link_fields(cfg: Any) -> None:
    """Validate the fields every link config has (PipeConfig and EndpointConfig)."""
    _check_int(cfg.port, "port", minimum=0)
    if cfg.port > 65535:
        raise ConfigError("port", f"{cfg.port} is not a TCP port")
    if cfg.transport not in TRANSPORTS:
        raise ConfigError("transport", f"{cfg.transport!r} is not one of {TRANSPORTS}")
    _check_device(cfg.device)
    if not isinstance(cfg.anticipate, bool):
        raise ConfigError("anticipate", f"must be True or False, got {cfg.anticipate!r}")
    _check_int(cfg.buffer_bytes, "buffer_bytes", minimum=1)
    resolve_max_frame_bytes(cfg)
    _check_seconds(cfg.connect_timeout, "connect_timeout", optional=False)
    _check_seconds(cfg.op_timeout, "op_timeout", optional=True)
    _check_seconds(cfg.close_timeout, "close_timeout", optional=False)
    _check_seconds(cfg.handshake_timeout, "handshake_timeout", optional=False)


def resolve_max_frame_bytes(cfg: Any) -> None:
    """Validate ``max_frame_bytes``, or fill in the default (a frozen config's
    own ``__post_init__`` only): ``buffer_bytes + DEFAULT_FRAME_MARGIN``.

    Remembers which it was, so :func:`_rederive_frame_limit` keeps a value
    the user chose and derives a default one again from a changed window.
    """
    derived = cfg.max_frame_bytes is None
    if derived:
        object.__setattr__(cfg, "max_frame_bytes", cfg.buffer_bytes + DEFAULT_FRAME_MARGIN)
    else:
        _check_int(cfg.max_frame_bytes, "max_frame_bytes", minimum=1)
    object.__setattr__(cfg, "_derived_frame_limit", derived)


def _rederive_frame_limit(cfg: Any, changes: dict[str, Any]) -> dict[str, Any]:
    if cfg._derived_frame_limit and "max_frame_bytes" not in changes:
        changes["max_frame_bytes"] = None
    return changes


def _check_host(value: Any, name: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        what = "a non-empty string or None" if optional else "a non-empty string"
        raise ConfigError(name, f"must be {what}, got {value!r}")


def _check_int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")


def _check_seconds(value: Any, name: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive finite number of seconds, got {value!r}")


def _check_device(device: Any) -> None:
    if not isinstance(device, str):
        raise ConfigError("device", f"must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    kind, sep, index = device.partition(":")
    digits = index.isascii() and index.isdigit()
    if kind not in ("cpu", "cuda") or (sep and not digits) or (kind == "cpu" and sep):
        raise ConfigError("device", f"{device!r} is not 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class EndpointConfig:
    """Configuration of one :class:`~aiokvpipe.endpoint.Endpoint`: a named
    instance that links to any other endpoint by address.

    ``host``/``port``: where this endpoint listens (``port=0``: ephemeral);
    peers dial ``ep.address``, which names ``advertise_host`` (default:
    ``host``; required when ``host`` is a wildcard such as ``"0.0.0.0"``).
    ``name`` labels it in messages, stats and metrics (default: its address).

    Liveness: every link sends a heartbeat each ``heartbeat_interval``; a peer
    silent for ``peer_timeout`` is declared dead and everything bound to it
    fails with PeerClosedError. ``peer_timeout`` must be at least twice the
    interval. ``buffer_bytes`` is the window of each peer direction.

    Token policy and ``handshake_timeout`` as in :class:`PipeConfig`;
    ``max_pending_handshakes`` caps connections that have not proved the
    token yet (the oldest is dropped to make room).
    """

    name: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    device: str = "cpu"
    transport: Transport = "auto"
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    max_frame_bytes: int = None  # type: ignore[assignment]  # None: derived, as in PipeConfig
    connect_timeout: float = 10.0
    op_timeout: float | None = None
    close_timeout: float = 10.0
    heartbeat_interval: float = 0.5
    peer_timeout: float = 2.0
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_pending_handshakes: int = 64
    token: str | bytes | None = field(default=None, repr=False)
    insecure: bool = False
    anticipate: bool = True
    _derived_frame_limit: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError("name", f"must be a string, got {self.name!r}")
        _check_host(self.host, "host", optional=False)
        _check_host(self.advertise_host, "advertise_host", optional=True)
        if self.advertise_host is None and _is_wildcard(self.host):
            raise ConfigError(
                "advertise_host",
                f"host={self.host!r} listens on every interface; say which address peers "
                "should dial (advertise_host='10.0.0.5')",
            )
        check_link_fields(self)
        _check_seconds(self.heartbeat_interval, "heartbeat_interval", optional=False)
        _check_seconds(self.peer_timeout, "peer_timeout", optional=False)
        if self.peer_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                "peer_timeout",
                f"{self.peer_timeout:g}s must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval:g}s), or one late heartbeat kills a live peer",
            )
        _check_int(self.max_pending_handshakes, "max_pending_handshakes", minimum=1)
        hosts = [self.host] if self.advertise_host is None else [self.host, self.advertise_host]
        check_token(self.token, hosts, self.insecure)

    @property
    def token_bytes(self) -> bytes | None:
        return token_bytes(self.token)

    def with_changes(self, **changes: Any) -> EndpointConfig:
        """A copy with ``changes``; a derived ``max_frame_bytes`` is derived again."""
        return replace(self, **_rederive_frame_limit(self, changes))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False
