"""Paged KV blocks: read and write by block id into registered memory.

:class:`BlockService` is what an endpoint plugs in (see its module doc for
the hooks); :class:`Lease` is what ``expose`` / ``expect`` return.
"""

from __future__ import annotations

from .lease import Lease
from .region import BlockRegion
from .service import BlockService, Dial

__all__ = ["BlockRegion", "BlockService", "Dial", "Lease"]
