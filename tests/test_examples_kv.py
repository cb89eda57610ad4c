"""The KV-buffer and backpressure examples, run as users run them.

Each example starts its peer as a second process and verifies its own
results; these tests check the exit status and the key lines of the output,
including the figures the examples claim (window never exceeded, producer
idle while blocked, every KV cache bit-exact).
"""

from __future__ import annotations

import re

import pytest
from test_examples import run_example


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_disagg_prefill_decode_moves_every_kv_cache_intact(loop: str) -> None:
    result = run_example("disagg_prefill_decode.py", "--loop", loop, timeout=120)
    out = result.stdout
    report = f"stdout:\n{out}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    if loop == "asyncio":
        assert "event loop: asyncio" in out, report
    rows = re.findall(
        r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\S+)\s*$", out, re.MULTILINE
    )
    assert [int(r[0]) for r in rows] == list(range(8)), report
    for _request, tokens, mib, fetch_ms, waited_ms, _misses, verdict in rows:
        assert int(tokens) > 0 and float(mib) > 0, report
        assert 0 < float(fetch_ms) <= float(waited_ms), report
        assert verdict == "ok", report
    inserted = re.findall(r"^\[prefill\] request (\d+): (\d+) tokens", out, re.MULTILINE)
    assert sorted(int(r) for r, _ in inserted) == list(range(8)), report
    assert re.search(r"fetch latency over 8 requests: p50 [\d.]+ ms, max [\d.]+ ms", out), report
    assert "[prefill] all 8 KV caches taken by decode" in out, report
    assert "OK: all 8 KV caches arrived bit-exact" in out, report
    assert "FAILED" not in out + result.stderr and "CORRUPT" not in out, report


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_backpressure_holds_the_window_and_waits_without_spinning(loop: str) -> None:
    result = run_example("backpressure.py", "--loop", loop, timeout=120)
    out = result.stdout
    report = f"stdout:\n{out}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    samples = re.findall(
        r"^\s*[\d.]+ s  \[[#.]+\]( \+ oversize)?\s+([\d.]+) / ([\d.]+) MiB$", out, re.M
    )
    assert len(samples) >= 3, report
    for oversize, pending, window in samples:
        limit = 6.0 if oversize else float(window)
        assert float(pending) <= limit, report
    # Full = no room for one more 512 KiB tensor: every message is also charged
    # its header and bookkeeping (wire.message_charge), so eight payloads of
    # an eighth of the window each no longer fit, and seven is full.
    assert any(float(w) - float(p) <= 0.5 for _, p, w in samples), f"window never filled\n{report}"
    peak = re.search(r"peak ([\d.]+) MiB pending with a ([\d.]+) MiB window", out)
    assert peak is not None and float(peak[1]) <= 6.0, report
    blocked = re.search(
        r"blocked in send for ([\d.]+) s of wall time, using ([\d.]+) ms of CPU \(([\d.]+)% ", out
    )
    assert blocked is not None, report
    wall_s, cpu_ms, share = float(blocked[1]), float(blocked[2]), float(blocked[3])
    assert wall_s > 0.2, report  # it really waited for the slow consumer ...
    assert cpu_ms / 1e3 <= 0.5 * wall_s and share <= 50, report  # ... without spinning
    assert "[consumer] received 65 tensors (38.0 MiB) intact" in out, report
    assert "OK: the window held" in out, report
    assert "VIOLATION" not in out and "FAILED" not in out + result.stderr, report
