"""Block id lists: validation, and coalescing adjacent ids into runs.

A transfer's bytes travel in the order of the caller's list (see
:mod:`aiokvpipe.blocks.region`), so each side cuts the same stream along its
*own* runs: ``remote_blocks=[7, 8, 9]`` into ``local_blocks=[3, 10, 11]`` is
one segment per outer index on the sender and two on the receiver. Nothing
requires the two lists to be adjacent in the same places.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from ..errors import BlockIdError

BlockRun = tuple[int, int]  # (first block id, number of blocks)


def as_ids(argument: str, ids: Any) -> tuple[int, ...]:
    """``ids`` as a tuple of ints: a list, tuple, range, or 1-D integer tensor.

    Bools and floats are refused (``True`` is not block 1). Raises
    :class:`BlockIdError` naming ``argument``.
    """
    if hasattr(ids, "tolist") and hasattr(ids, "dim"):  # a torch tensor
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise BlockIdError(
                argument, (), f"a tensor of block ids must be 1-D integers, not {ids.dtype}"
            )
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise BlockIdError(
            argument, (), f"expected a sequence of block ids, not {type(ids).__name__}"
        )
    if set(map(type, ids)) <= {int}:  # plain ints (the usual case): no per-id Python loop
        return tuple(ids)
    out: list[int] = []
    for value in ids:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise BlockIdError(argument, (), f"block id {value!r} is not an integer")
        out.append(operator.index(value))
    return tuple(out)


def check_ids(
    argument: str, ids: Sequence[int], count: int, what: str, noun: str = "block id"
) -> None:
    """Every id in ``range(count)`` and none repeated; ``what`` names the owner of the range."""
    if not ids:
        return
    # min/max and the set run in C: this check sits on every transfer's
    # path, cold after each payload, so the per-id loop runs only to name
    # what is wrong.
    bad = (
        sorted({i for i in ids if not 0 <= i < count}) if min(ids) < 0 or max(ids) >= count else []
    )
    if bad:
        raise BlockIdError(
            argument, bad, f"{_show(noun, bad)} out of range for {what} (valid: 0..{count - 1})"
        )
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dups: set[int] = set()
        for i in ids:
            (dups if i in seen else seen).add(i)
        ordered = sorted(dups)
        verb = "appears" if len(ordered) == 1 else "appear"
        raise BlockIdError(
            argument, ordered, f"{_show(noun, ordered)} {verb} more than once in one call"
        )


def check_same_length(first: str, a: Sequence[int], second: str, b: Sequence[int]) -> None:
    if len(a) != len(b):
        raise BlockIdError(
            second,
            (len(a), len(b)),
            f"{len(b)} ids against {len(a)} in {first}; both lists must name the same blocks",
        )


def coalesce(ids: Sequence[int]) -> list[BlockRun]:
    """Consecutive ascending ids merged: ``[3, 4, 5, 9, 2]`` -> ``[(3, 3), (9, 1), (2, 1)]``."""
    runs: list[BlockRun] = []
    start = prev = -2
    length = 0
    for i in ids:
        if i == prev + 1 and length:
            length += 1
        else:
            if length:
                runs.append((start, length))
            start, length = i, 1
        prev = i
    if length:
        runs.append((start, length))
    return runs


def pair_runs(dst: Sequence[int], src: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(dst first, src first, count)`` where both lists advance by one together.

    A device-to-device copy needs both ends contiguous at once:
    ``dst=[0, 1, 2, 9]``, ``src=[5, 6, 8, 9]`` -> ``[(0, 5, 2), (2, 8, 1), (9, 9, 1)]``.
    """
    out: list[tuple[int, int, int]] = []
    for d, s in zip(dst, src, strict=True):
        if out:
            d0, s0, n = out[-1]
            if d == d0 + n and s == s0 + n:
                out[-1] = (d0, s0, n + 1)
                continue
        out.append((d, s, 1))
    return out


def _show(noun: str, values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    more = f" (+{len(values) - limit} more)" if len(values) > limit else ""
    label = noun if len(values) == 1 else noun + "s"
    return f"{label} {shown}{more}"
