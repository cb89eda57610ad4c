"""The benchmark plots: a PNG is written for full, partial and empty runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiokvpipe.bench.report import Result, write_json

pytest.importorskip("matplotlib")

from aiokvpipe.bench.plot import load_results, plot_results

KiB, MiB = 1 << 10, 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pipe_results() -> list[Result]:
    """Shaped like bench/pipe.py's output (names, units, extra)."""
    out = []
    for loop in ("asyncio", "uvloop"):
        for size, gbps in ((4 * KiB, 0.3), (64 * KiB, 1.5), (4 * MiB, 3.9)):
            out.append(
                Result(
                    "pipe/tcp",
                    f"throughput {size // KiB} KiB ({loop})",
                    gbps,
                    "GB/s",
                    "raw blocking socket",
                    gbps * 1.1,
                    extra={"size": size, "loop": loop, "count": 10, "transport": "tcp"},
                )
            )
        out.append(
            Result(
                "pipe/tcp",
                f"throughput 4 MiB vs gloo ({loop})",
                3.9,
                "GB/s",
                "gloo send/recv",
                2.5,
                "> 1.0x gloo",
                True,
            )
        )
        out.append(
            Result(
                "pipe/tcp",
                f"4 KiB round trip p50 ({loop})",
                20.0,
                "us",
                f"raw asyncio ping-pong ({loop})",
                14.0,
            )
        )
        out.append(
            Result(
                "pipe/tcp",
                f"4 KiB round trip p99 ({loop})",
                45.0,
                "us",
                f"raw asyncio ping-pong ({loop})",
                30.0,
            )
        )
        out.append(
            Result(
                "pipe/tcp",
                f"loop lag p99, sender, 256 MiB moving ({loop})",
                0.4,
                "ms",
                "1 ms ticker period",
                1.0,
            )
        )
    out.append(Result("pipe/tcp", "single-core memcpy 64 MiB", 11.0, "GB/s"))
    out.append(Result("pipe/tcp", "backpressure: sender CPU while blocked", 0.1, "% of a core"))
    return out


def _ring_results() -> list[Result]:
    return [
        Result(
            "ring", "uvloop: wake-up p50, 64 B every 2 ms, 1 reader", 9.0, "us", "mp.Pipe p50", 30.0
        ),
        Result("ring", "uvloop: 1 MiB messages, 1 reader", 9.5, "GB/s", "1-core memcpy", 11.9),
    ]


@pytest.fixture(scope="module", autouse=True)
def _warm_font_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """matplotlib keeps the font files it has used open for the life of the
    process (a cache, not a leak); open them before the per-test fd check."""
    plot_results(_pipe_results() + _ring_results(), str(tmp_path_factory.mktemp("warm") / "w.png"))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_plot_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    plot_results(_pipe_results() + _ring_results(), str(out))
    _assert_png(out)


@pytest.mark.parametrize(
    "results",
    [
        pytest.param(_ring_results()[:1], id="latency-only"),
        pytest.param([r for r in _pipe_results() if r.unit == "GB/s"], id="throughput-only"),
        pytest.param([], id="empty"),
        pytest.param([Result("cuda", "something else", 1.0, "ops")], id="nothing-plottable"),
    ],
)
def test_plot_tolerates_missing_suites(tmp_path: Path, results: list[Result]) -> None:
    out = tmp_path / "partial.png"
    plot_results(results, str(out))
    _assert_png(out)


def test_replot_from_json(tmp_path: Path) -> None:
    saved = tmp_path / "results.json"
    write_json(_pipe_results(), str(saved))
    loaded = load_results(str(saved))
    assert [r.as_dict() for r in loaded] == json.loads(saved.read_text())
    out = tmp_path / "replot.png"
    plot_results(loaded, str(out))
    _assert_png(out)
