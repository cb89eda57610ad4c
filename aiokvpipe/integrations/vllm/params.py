"""``kv_transfer_params``: what the prefill hands the decode, through the proxy.

The prefill instance's scheduler returns these params with the request's
output; the proxy (or an offline caller) copies them unchanged into the
decode request. They carry everything the decode needs to pull the blocks:
the owner's endpoint address per tensor-parallel rank, the request id the
lease is filed under, the block ids and how many tokens they hold. No token,
no secret: a reader still has to prove the shared token to the owner, and the
owner only serves what the lease grants.

The flags follow vLLM's NIXL connector, so proxies written for it work:
``do_remote_decode`` on the request sent to the prefill, ``do_remote_prefill``
on the params it returns. This module imports nothing from vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CORRUPT_KEY",
    "PARAMS_VERSION",
    "InvalidParams",
    "RemotePrefill",
    "prefill_params",
]

#: Bumped when the keys change meaning; a decode refuses params of another version.
PARAMS_VERSION = 1
#: The test-only per-request switch (honoured only with ``test_hooks``).
CORRUPT_KEY = "aiokvpipe_test_flip_bits"


class InvalidParams(ValueError):
    """The params of a decode request cannot drive a pull. The decode then
    computes the prompt itself (never reads blocks it cannot vouch for)."""


def prefill_params(
    *,
    engine_id: str,
    request_id: str,
    addresses: Sequence[str],
    block_ids: Sequence[int],
    num_tokens: int,
    block_size: int,
) -> dict[str, Any]:
    """The params a prefill returns for a request whose blocks it now exposes."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "transfer_mode": "pull",
        "aiokvpipe_version": PARAMS_VERSION,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_addresses": list(addresses),
        "remote_block_ids": list(block_ids),
        "remote_num_tokens": num_tokens,
        "remote_block_size": block_size,
    }


def _int_list(params: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = params.get(key)
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise InvalidParams(f"{key} must be a list of block ids, got {value!r}")
    return tuple(value)


def _str(params: Mapping[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidParams(f"{key} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class RemotePrefill:
    """A decode request's pull instructions, validated."""

    engine_id: str
    request_id: str
    addresses: tuple[str, ...]
    block_ids: tuple[int, ...]
    num_tokens: int
    block_size: int
    corrupt: bool = False

    @classmethod
    def parse(cls, params: Mapping[str, Any], *, block_size: int) -> RemotePrefill:
        """Validate the params against this instance (block size); raise InvalidParams."""
        version = params.get("aiokvpipe_version")
        if version != PARAMS_VERSION:
            raise InvalidParams(
                f"aiokvpipe_version is {version!r}, this connector reads {PARAMS_VERSION} "
                "(were these params made by AiokvpipeConnector?)"
            )
        addresses = params.get("remote_addresses")
        if (
            not isinstance(addresses, (list, tuple))
            or not addresses
            or not all(isinstance(a, str) and a for a in addresses)
        ):
            raise InvalidParams(f"remote_addresses must be a list of addresses, got {addresses!r}")
        num_tokens = params.get("remote_num_tokens")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
            raise InvalidParams(f"remote_num_tokens must be a positive int, got {num_tokens!r}")
        remote_block_size = params.get("remote_block_size")
        if remote_block_size != block_size:
            raise InvalidParams(
                f"remote_block_size={remote_block_size!r} differs from this instance's "
                f"block_size={block_size}: the blocks cannot be copied one to one"
            )
        block_ids = _int_list(params, "remote_block_ids")
        needed = -(-num_tokens // block_size)
        if len(block_ids) < needed:
            raise InvalidParams(
                f"remote_block_ids has {len(block_ids)} blocks, {num_tokens} tokens of "
                f"block_size {block_size} need {needed}"
            )
        return cls(
            engine_id=_str(params, "remote_engine_id"),
            request_id=_str(params, "remote_request_id"),
            addresses=tuple(addresses),
            block_ids=block_ids[:needed],
            num_tokens=num_tokens,
            block_size=block_size,
            corrupt=params.get(CORRUPT_KEY) is True,
        )

    def address_for(self, rank: int) -> str:
        """The owner endpoint that holds tensor-parallel rank ``rank``'s shard."""
        if rank >= len(self.addresses):
            raise InvalidParams(
                f"the prefill ran {len(self.addresses)} tensor-parallel rank(s); "
                f"rank {rank} of this decode has no shard to read"
            )
        return self.addresses[rank]
