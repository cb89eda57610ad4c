"""PipeConfig: everything a Pipe needs to know, validated once at construction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from .errors import ConfigError

Transport = Literal["auto", "tcp", "shm", "nccl", "cuda_ipc"]
TRANSPORTS: tuple[str, ...] = ("auto", "tcp", "shm", "nccl", "cuda_ipc")

DEFAULT_PORT = 29600
DEFAULT_BUFFER_BYTES = 1 << 30
# A hostile or confused peer can announce any size; this bounds what one
# frame may make us allocate. 16 GiB covers any single KV block in practice.
DEFAULT_MAX_FRAME_BYTES = 1 << 34


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
    """

    rank: int
    world_size: int = 2
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    device: str = "cpu"
    transport: Transport = "auto"
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    connect_timeout: float = 30.0
    op_timeout: float | None = None
    close_timeout: float = 10.0
    token: str | bytes | None = None
    bind_host: str | None = None
    anticipate: bool = True

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
        _check_int(self.max_frame_bytes, "max_frame_bytes", minimum=1)
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
        return replace(self, **changes)

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
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(sorted(unknown)[0], "is not a PipeConfig field")
        return cls(**values)


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
