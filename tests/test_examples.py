"""The examples run as users run them: a fresh interpreter, real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, str(EXAMPLES / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the failure report
        pytest.fail(f"{name} did not finish in {timeout} s; output so far:\n{exc.stdout!r}")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_demo_transfers_and_verifies_every_tensor(loop: str) -> None:
    result = run_example("demo.py", "--loop", loop, "--pings", "300", timeout=180)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    out = result.stdout

    expected_loop = "asyncio" if loop == "asyncio" else ("uvloop" if _has_uvloop() else "asyncio")
    assert re.search(rf"event loop: {expected_loop}", out), report
    for size in ("4 KiB", "1 MiB", "16 MiB", "64 MiB"):
        row = re.search(
            rf"^\s*{size}\s+(\d+)\s+\S+\s+([\d.]+)\s+(\d+)-(\d+)\s+(\S+)\s*$", out, re.MULTILINE
        )
        assert row is not None, f"no table row for {size}\n{report}"
        count, mb_per_s, verdict = int(row[1]), float(row[2]), row[5]
        assert count > 0 and mb_per_s > 0 and verdict == "ok", report
        # the median of the timed passes lies within their range
        assert int(row[3]) - 1 <= mb_per_s <= int(row[4]) + 1, report
    latency = re.search(r"round trip over (\d+) pings: p50 (\d+) us, p99 (\d+) us", out)
    assert latency is not None, report
    assert int(latency[1]) == 300 and 0 < int(latency[2]) <= int(latency[3]), report
    # warm figures, and the demo says what it timed (issue 17)
    assert "after a warm-up pass" in out and "after 100 warm-up pings" in out, report
    assert "OK: every tensor verified by rank 1" in out, report
    assert "FAILED" not in out + result.stderr, report


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_broadcast_workers_answer_every_step() -> None:
    result = run_example("broadcast_workers.py", "--workers", "2", timeout=150)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    assert re.search(r"ring 'aiokv_\w+' with 2 readers, 20 steps", result.stdout), report
    latency = re.search(r"broadcast -> 2 answers: p50 ([\d.]+) ms, max ([\d.]+) ms", result.stdout)
    assert latency is not None and 0 < float(latency[1]) <= float(latency[2]), report
    assert "OK: every worker answered every step correctly (2 workers)" in result.stdout, report


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_paged_kv_pulls_and_pushes_blocks_bit_exact(transport: str) -> None:
    result = run_example(
        "paged_kv.py", "--transport", transport, "--num-blocks", "64", "--request-blocks", "16",
        timeout=150,
    )  # fmt: skip
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    out = result.stdout
    assert re.search(rf"request: 16 scattered blocks \(\d+ MiB\); transport: {transport}", out)
    pull = re.search(r"pull .*: 16 blocks x 4 layers in ([\d.]+) ms .*bit-exact: yes", out)
    assert pull is not None and float(pull[1]) > 0, report
    push = re.search(r"layer-wise push: 4 layers.*bit-exact: yes, other blocks untouched: yes", out)
    assert push is not None, report
    assert "OK: pulled and pushed blocks arrived bit-exact" in out, report
    assert "FAILED" not in out + result.stderr, report


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_xpyd_survives_a_decode_killed_and_restarted() -> None:
    result = run_example("xpyd.py", "--requests", "120", timeout=100)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    for name in ("p0", "p1"):
        assert re.search(rf"^{name}: 120/120 answered", result.stdout, re.MULTILINE), report
    served = re.search(r"d0 served (\d+), d1 \(new instance\) served (\d+)", result.stdout)
    assert served is not None and int(served[2]) > 0, report
    assert "OK: every request answered and verified" in result.stdout, report
