"""Config hardening (issue 15, defect 8): the token stays out of reprs, and a
frame may not exceed the window by more than a margin unless the user asks."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from test_pipe_faults import fake_predecessor, frame, write
from transport_conformance import assert_same, tagged

from aiokvpipe import ConfigError, FrameTooLargeError, PipeConfig
from aiokvpipe.config import DEFAULT_FRAME_MARGIN, EndpointConfig
from aiokvpipe.wire import FrameHeader, FrameKind

TOKEN = "do-not-print-me-0123456789abcdef"


def test_the_token_never_shows_in_a_config_repr() -> None:
    for cfg in (
        PipeConfig(rank=0, token=TOKEN),
        PipeConfig(rank=0, token=TOKEN.encode()),
        EndpointConfig(token=TOKEN),
    ):
        for text in (repr(cfg), str(cfg), f"{cfg}", repr([cfg])):
            assert TOKEN not in text and "do-not-print" not in text, text
        assert cfg.token_bytes == TOKEN.encode()  # still there, just not printed


def test_max_frame_bytes_defaults_to_the_window_plus_a_margin() -> None:
    cfg = PipeConfig(rank=0, buffer_bytes=1 << 20)
    assert cfg.max_frame_bytes == (1 << 20) + DEFAULT_FRAME_MARGIN
    assert PipeConfig(rank=0).max_frame_bytes == (1 << 30) + DEFAULT_FRAME_MARGIN
    assert PipeConfig(rank=0, max_frame_bytes=None).max_frame_bytes == cfg.max_frame_bytes + (
        (1 << 30) - (1 << 20)
    )
    # Far below the old 16 GiB, and never below what the window itself holds.
    assert DEFAULT_FRAME_MARGIN <= 1 << 30
    # A derived limit follows the window when the window changes ...
    bigger = cfg.with_changes(buffer_bytes=1 << 32)
    assert bigger.max_frame_bytes == (1 << 32) + DEFAULT_FRAME_MARGIN
    assert bigger.with_changes(buffer_bytes=1 << 20) == cfg
    # ... one the user set is theirs: kept as given, through every change.
    explicit = PipeConfig(rank=0, buffer_bytes=1 << 20, max_frame_bytes=1 << 36)
    assert explicit.max_frame_bytes == 1 << 36
    assert explicit.with_changes(buffer_bytes=1 << 30).max_frame_bytes == 1 << 36
    assert explicit.with_changes(max_frame_bytes=None).max_frame_bytes == (
        (1 << 20) + DEFAULT_FRAME_MARGIN
    )
    small = PipeConfig(rank=0, buffer_bytes=1 << 30, max_frame_bytes=4096)
    assert small.max_frame_bytes == 4096  # below the window is allowed too
    assert dataclasses.replace(explicit, rank=1).max_frame_bytes == 1 << 36
    for bad in (0, -1, "1", 1.5, True):
        with pytest.raises(ConfigError, match=r"^max_frame_bytes"):
            PipeConfig(rank=0, max_frame_bytes=bad)
    ep = EndpointConfig(buffer_bytes=1 << 20)
    assert ep.max_frame_bytes == (1 << 20) + DEFAULT_FRAME_MARGIN
    assert ep.with_changes(buffer_bytes=1 << 22).max_frame_bytes == (1 << 22) + DEFAULT_FRAME_MARGIN
    assert EndpointConfig(max_frame_bytes=1 << 40).max_frame_bytes == 1 << 40


@pytest.mark.timeout(20)
async def test_a_receiver_refuses_frames_beyond_its_window_plus_margin_by_default() -> None:
    """A peer announcing a frame larger than ``buffer_bytes + margin`` (no
    ``max_frame_bytes`` set) is refused from the header, before any
    allocation; a tensor larger than the window but within the margin passes."""
    window = 1 << 20
    async with fake_predecessor(buffer_bytes=window) as (victim, sock):
        assert victim.config.max_frame_bytes == window + DEFAULT_FRAME_MARGIN
        oversize = torch.arange(2 * window // 8, dtype=torch.int64)  # 2x the window
        await write(sock, frame(0, tagged(1)) + frame(1, oversize))
        assert_same(await asyncio.wait_for(victim.recv(), 5), tagged(1))
        assert_same(await asyncio.wait_for(victim.recv(), 5), oversize)
        huge = window + DEFAULT_FRAME_MARGIN + 1
        header = FrameHeader(FrameKind.TENSOR, 2, torch.uint8, (huge,), huge).encode()
        await write(sock, header)
        with pytest.raises(FrameTooLargeError, match=f"frame of {huge} payload bytes"):
            await asyncio.wait_for(victim.recv(), 5)
