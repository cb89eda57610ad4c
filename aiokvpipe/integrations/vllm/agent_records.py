"""The transfer agent's bookkeeping: orders in, results out, loads and counters.

What the connector hands :class:`~.agent.TransferAgent` (:class:`ReadOrder`),
what it hands back from ``poll`` (:class:`TransferResults`), one request's
sync-mode layer reads (``_Load``) and the counters of a reporting interval
(``_Stats``). Plain records with no transfer logic; import the public ones
from :mod:`.agent`.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReadOrder:
    """One pull: the owner's blocks into ours, pairwise."""

    request_id: str
    address: str
    remote_request_id: str
    remote_blocks: tuple[int, ...]
    local_blocks: tuple[int, ...]
    num_tokens: int = 0
    corrupt: bool = False


@dataclass
class TransferResults:
    """What ended since the last :meth:`TransferAgent.poll`.

    ``failed_recving`` maps each failed read's request id to its cause; those
    ids are in ``finished_recving`` too (vLLM releases a request from its
    transfer wait either way and then applies its failure policy).
    ``leases_ended``: ended leases on pinned blocks (exposed with
    ``pinned=True``), which the scheduler side releases itself.
    """

    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: dict[str, str] = field(default_factory=dict)
    leases_ended: set[str] = field(default_factory=set)


@dataclass
class _Load:
    """One request's layer reads in the current step (sync mode)."""

    order: ReadOrder
    started: float
    futures: dict[int, concurrent.futures.Future[None]] = field(default_factory=dict)
    failure: str = ""


class _Stats:
    """Counters of one reporting interval, filled on the loop thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.data = {
            "reads": 0,
            "failed_reads": 0,
            "read_bytes": 0,
            "read_tokens": 0,
            "read_seconds": [],
            "exposed": 0,
            "leases_done": 0,
            "leases_failed": 0,
        }

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                self.data[key] += value

    def add_read(self, nbytes: int, tokens: int, seconds: float) -> None:
        with self.lock:
            self.data["reads"] += 1
            self.data["read_bytes"] += nbytes
            self.data["read_tokens"] += tokens
            self.data["read_seconds"].append(seconds)

    def take(self) -> dict[str, Any] | None:
        with self.lock:
            data = self.data
            if not any(data[k] for k in ("reads", "failed_reads", "exposed", "leases_done")):
                if not data["leases_failed"]:
                    return None
            self.reset()
            return data
