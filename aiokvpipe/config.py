"""PipeConfig: everything a Pipe needs to know, validated once at construction."""

from __future__ import annotations

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
    _derived_frame_limit: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int(self.world_size, "world_size", minimum=2)
        _check_int(self.rank, "rank", minimum=0)
        if self.rank >= self.world_size:
            raise ConfigError("rank", f"{self.rank} is not below world_size={self.world_size}")
        _check_int(self.port, "port", minimum=0)
        if self.port > 65535:
            raise ConfigError("port", f"{self.port} is not a TCP port")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("host", f"must be a non-empty string, got {self.host!r}")
        if self.bind_host is not None and (
            not isinstance(self.bind_host, str) or not self.bind_host
        ):
            raise ConfigError(
                "bind_host", f"must be a non-empty string or None, got {self.bind_host!r}"
            )
        if self.transport not in TRANSPORTS:
            raise ConfigError("transport", f"{self.transport!r} is not one of {TRANSPORTS}")
        _check_device(self.device)
        if not isinstance(self.anticipate, bool):
            raise ConfigError("anticipate", f"must be True or False, got {self.anticipate!r}")
        _check_int(self.buffer_bytes, "buffer_bytes", minimum=1)
        resolve_max_frame_bytes(self)
        _check_seconds(self.connect_timeout, "connect_timeout", optional=False)
        _check_seconds(self.op_timeout, "op_timeout", optional=True)
        _check_seconds(self.close_timeout, "close_timeout", optional=False)
        if self.token is not None:
            if not isinstance(self.token, (str, bytes)) or len(self.token) == 0:
                raise ConfigError("token", "must be a non-empty str or bytes, or None")

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    @property
    def token_bytes(self) -> bytes | None:
        if self.token is None:
            return None
        return self.token.encode() if isinstance(self.token, str) else self.token

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
