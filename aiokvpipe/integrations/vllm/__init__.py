"""aiokvpipe as a vLLM v1 KV connector (pull mode, like vLLM's NIXL connector).

Select it with::

    --kv-transfer-config '{"kv_connector": "AiokvpipeConnector",
      "kv_connector_module_path": "aiokvpipe.integrations.vllm",
      "kv_role": "kv_both",
      "kv_connector_extra_config": {"host": "127.0.0.1", "port": 0,
                                    "token_env": "AIOKVPIPE_TOKEN"}}'

The connector class loads vLLM on first access (PEP 562), so the vLLM-free
parts (settings, params, the transfer agent, the tiny-model builder) import
and test without vLLM installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connector import (
        AiokvpipeConnector,
        AiokvpipeConnectorMetadata,
        AiokvpipeConnectorStats,
        AiokvpipeHandshake,
    )

_LAZY = {
    "AiokvpipeConnector": ".connector",
    "AiokvpipeConnectorMetadata": ".connector",
    "AiokvpipeConnectorStats": ".connector",
    "AiokvpipeHandshake": ".connector",
}

__all__ = [
    "AiokvpipeConnector",
    "AiokvpipeConnectorMetadata",
    "AiokvpipeConnectorStats",
    "AiokvpipeHandshake",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
