"""The connector's settings, read from ``kv_connector_extra_config``.

vLLM hands the connector one free-form dict. This module turns it into a
frozen, validated :class:`ConnectorSettings` once, at start-up, so a typo or a
missing token fails the engine's start with a :class:`ConfigError` naming the
key, not the first transfer an hour later. It imports nothing from vLLM, so
its tests run without vLLM installed.

Keys (all optional):

* ``host``, ``port``, ``advertise_host``, ``transport``, ``heartbeat_interval``,
  ``peer_timeout``, ``connect_timeout``, ``buffer_bytes``, ``insecure``: the
  worker endpoint's :class:`~aiokvpipe.config.EndpointConfig` fields.
  ``port`` 0 picks an ephemeral port; a fixed port is offset by the worker's
  tensor-parallel rank, so each rank listens on its own.
* ``token_env``: the name of the environment variable that holds the shared
  token. The token itself never appears in the config, in params or in logs.
* ``lease_ttl`` (s, default 30): how long a prefill instance keeps a finished
  request's blocks for the decode to read; after that they are freed and a
  late read fails (the decode then follows ``kv_load_failure_policy``).
* ``read_timeout`` (s, default 30): the most one pull may take on the decode
  side, retries included. Bounds every wait: no read hangs a request.
* ``lease_grace`` (s, default 2): the prefill's scheduler publishes the
  params one engine step before its worker grants the lease; a decode that is
  faster than that step is told "not granted" and retries for this long.
* ``load_mode`` (default ``"sync"``): how the decode loads a request's KV.
  ``"sync"``: the request is scheduled at once, in the same engine step that
  decides it, and its blocks are read layer by layer while that step's
  forward pass runs (each attention layer waits for its own layer only), as
  vLLM's in-step connectors do; a failed read marks the blocks invalid and
  vLLM applies ``kv_load_failure_policy`` in the same step. ``"async"``: the
  request waits in WAITING_FOR_REMOTE_KVS while the whole pull runs beside
  other requests' steps, and is scheduled once it ended (vLLM's NIXL
  connector's way): it never stalls a step, but costs the request extra
  engine steps. See docs/vllm.md for the measured difference.
* ``layers_per_read`` (default 0): sync mode, how many layers one read
  carries; 0: all of them (one read per request, the forward pass starts
  when it landed); 1: one read per layer, each layer's attention waits for
  its own (the pipelining pays off when a layer's compute outlasts a round
  trip: big models, long prompts).
* ``pin_blocks`` (default True): a prefill pins a finished request's blocks
  in vLLM's block pool until the decode read them, and the request ends for
  vLLM at once; False: the request holds them (it stays in vLLM's books,
  which keeps the engine stepping every millisecond until the lease ends).
* ``test_hooks`` (default False): lets a request ask, through its
  ``kv_transfer_params``, for the bits of its transferred blocks to be
  flipped (the negative control of the test suite). Off in production.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...config import EndpointConfig
from ...errors import ConfigError

__all__ = ["ENDPOINT_KEYS", "LOAD_MODES", "ConnectorSettings"]

#: extra_config keys passed through to EndpointConfig unchanged.
ENDPOINT_KEYS: tuple[str, ...] = (
    "host",
    "port",
    "advertise_host",
    "transport",
    "heartbeat_interval",
    "peer_timeout",
    "connect_timeout",
    "buffer_bytes",
    "insecure",
)
_OWN_KEYS: tuple[str, ...] = (
    "token_env",
    "lease_ttl",
    "read_timeout",
    "lease_grace",
    "load_mode",
    "layers_per_read",
    "pin_blocks",
    "test_hooks",
)
#: The values of ``load_mode``.
LOAD_MODES: tuple[str, ...] = ("sync", "async")


def _seconds(extra: Mapping[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a positive finite number of seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConnectorSettings:
    """Validated connector settings. ``endpoint`` holds the EndpointConfig
    keyword arguments except ``name`` and ``token`` (see :meth:`endpoint_config`)."""

    endpoint: Mapping[str, Any]
    token_env: str | None = None
    lease_ttl: float = 30.0
    read_timeout: float = 30.0
    lease_grace: float = 2.0
    load_mode: str = "sync"
    layers_per_read: int = 0
    pin_blocks: bool = True
    test_hooks: bool = False
    token: str | None = field(default=None, repr=False)

    @property
    def load_async(self) -> bool:
        """Whether a decode pulls before scheduling (``load_mode: async``)."""
        return self.load_mode == "async"

    @classmethod
    def from_extra(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ConnectorSettings:
        """Validate ``kv_connector_extra_config``; read the token from ``environ``.

        Unknown keys are refused (a misspelt ``lease_tll`` would otherwise be
        silently ignored). The endpoint keys are checked by building an
        EndpointConfig, so the same rules and messages apply as everywhere.
        """
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(ENDPOINT_KEYS) - set(_OWN_KEYS))
        if unknown:
            known = ", ".join(sorted(ENDPOINT_KEYS + _OWN_KEYS))
            raise ConfigError(
                "kv_connector_extra_config",
                f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: {known}",
            )
        environ = os.environ if environ is None else environ
        token_env = extra.get("token_env")
        token: str | None = None
        if token_env is not None:
            if not isinstance(token_env, str) or not token_env:
                raise ConfigError(
                    "token_env", f"must name an environment variable, got {token_env!r}"
                )
            token = environ.get(token_env)
            if not token:
                # Name the variable, never a value.
                raise ConfigError(
                    "token_env", f"environment variable {token_env} is not set or empty"
                )
        test_hooks = extra.get("test_hooks", False)
        if not isinstance(test_hooks, bool):
            raise ConfigError("test_hooks", f"must be true or false, got {test_hooks!r}")
        layers_per_read = extra.get("layers_per_read", 0)
        if (
            isinstance(layers_per_read, bool)
            or not isinstance(layers_per_read, int)
            or layers_per_read < 0
        ):
            raise ConfigError(
                "layers_per_read", f"must be an int >= 0 (0: all), got {layers_per_read!r}"
            )
        pin_blocks = extra.get("pin_blocks", True)
        if not isinstance(pin_blocks, bool):
            raise ConfigError("pin_blocks", f"must be true or false, got {pin_blocks!r}")
        load_mode = extra.get("load_mode", "sync")
        if load_mode not in LOAD_MODES:
            raise ConfigError(
                "load_mode", f"must be one of {', '.join(LOAD_MODES)}, got {load_mode!r}"
            )
        endpoint = {key: extra[key] for key in ENDPOINT_KEYS if key in extra}
        settings = cls(
            endpoint=endpoint,
            token_env=token_env,
            lease_ttl=_seconds(extra, "lease_ttl", 30.0),
            read_timeout=_seconds(extra, "read_timeout", 30.0),
            lease_grace=_seconds(extra, "lease_grace", 2.0),
            load_mode=load_mode,
            layers_per_read=layers_per_read,
            pin_blocks=pin_blocks,
            test_hooks=test_hooks,
            token=token,
        )
        settings.endpoint_config(name="check", rank=0)  # raises ConfigError on a bad field
        return settings

    def endpoint_config(self, *, name: str, rank: int) -> EndpointConfig:
        """The EndpointConfig of tensor-parallel rank ``rank``'s worker."""
        kwargs = dict(self.endpoint)
        port = kwargs.get("port", 0)
        if isinstance(port, int) and not isinstance(port, bool) and port > 0:
            kwargs["port"] = port + rank
        return EndpointConfig(name=name, token=self.token, **kwargs)
