"""The one timeout mechanism: a deadline scope that raises TransferTimeout."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .errors import TransferTimeout

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout_scope
else:  # pragma: no cover - exercised on 3.10 only
    from anyio import fail_after as _timeout_scope


@asynccontextmanager
async def deadline(seconds: float | None, describe: Callable[[], str]) -> AsyncIterator[None]:
    """Run the body under ``seconds`` (None: unbounded).

    On expiry raise :class:`TransferTimeout` with ``describe()``'s text; the
    description is built lazily so the fast path formats nothing.
    """
    if seconds is None:
        yield
        return
    try:
        async with _timeout_scope(seconds):
            yield
    except TimeoutError as exc:
        if isinstance(exc, TransferTimeout):
            raise
        raise TransferTimeout(f"{describe()} (timed out after {seconds:g}s)") from exc
