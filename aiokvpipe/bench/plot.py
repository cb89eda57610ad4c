"""Figures for ``python -m aiokvpipe.bench SUITE --plot PNG``.

Two panels, each drawn only when the results hold something for it:

* **throughput vs message size** (log x): one line per suite and event loop
  for figures that carry ``extra["size"]`` (or name a size such as ``4 MiB``)
  in a bandwidth unit, with their same-run baselines dashed or as markers;
* **latency percentiles**: every microsecond figure whose name says ``p50``
  or ``p99``, as a bar beside its baseline's bar (log scale when the figures
  span more than 20x).

matplotlib is optional (``pip install 'aiokvpipe[plot]'``) and imported only
here; figures are drawn with the Agg canvas, never through pyplot, so
plotting touches no global backend state. Re-plot a saved run with
``python -m aiokvpipe.bench.plot results.json out.png``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .report import Result

__all__ = ["check_available", "load_results", "plot_results"]

_INSTALL_HINT = "plotting benchmark results needs matplotlib: pip install 'aiokvpipe[plot]'"

# Bandwidth units the throughput panel understands, as factors to GB/s.
_TO_GBPS = {"GB/s": 1.0, "MB/s": 1e-3, "GiB/s": (1 << 30) / 1e9, "MiB/s": (1 << 20) / 1e9}
# Latency units the latency panel understands, as factors to microseconds.
_TO_US = {"us": 1.0, "µs": 1.0}
_SIZE_IN_NAME = re.compile(r"\b(\d+) (B|KiB|MiB|GiB)\b")
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_LOOP_IN_NAME = re.compile(r"\b(asyncio|uvloop)\b")
_PERCENTILE_IN_NAME = re.compile(r"\bp(50|90|99|999)\b")


def _import_matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Figure, FigureCanvasAgg, FuncFormatter


def check_available() -> None:
    """Raise ImportError (with the install hint) now rather than after a long run."""
    _import_matplotlib()


# ----------------------------------------------------------------- selecting figures


def _size_of(result: Result) -> int | None:
    size = result.extra.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = _SIZE_IN_NAME.search(result.name)
    if match is None:
        return None
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _loop_of(result: Result) -> str | None:
    loop = result.extra.get("loop")
    if isinstance(loop, str) and loop:
        return loop
    match = _LOOP_IN_NAME.search(result.name)
    return match.group(1) if match else None


@dataclass
class _Throughput:
    # (suite, loop) -> {size: GB/s}; first figure per size wins (later rows
    # such as "throughput 4 MiB vs gloo" repeat the same measurement).
    series: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    # (suite, baseline name) -> {size: GB/s}
    baselines: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    # reference figures with neither loop nor baseline (e.g. memcpy): name -> (size, GB/s)
    references: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.series or self.references)


def _throughput(results: Sequence[Result]) -> _Throughput:
    panel = _Throughput()
    for r in results:
        factor = _TO_GBPS.get(r.unit)
        size = _size_of(r)
        if factor is None or size is None:
            continue
        loop = _loop_of(r)
        if loop is None and r.baseline_value is None:
            panel.references.setdefault(f"{r.suite}: {r.name}", (size, r.value * factor))
            continue
        panel.series.setdefault((r.suite, loop or "-"), {}).setdefault(size, r.value * factor)
        if r.baseline_value is not None and r.baseline_name:
            panel.baselines.setdefault((r.suite, r.baseline_name), {}).setdefault(
                size, r.baseline_value * factor
            )
    return panel


def _latency(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if r.unit in _TO_US and _PERCENTILE_IN_NAME.search(r.name)]


# ----------------------------------------------------------------- drawing


def _human(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit]
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _draw_throughput(ax: Any, panel: _Throughput) -> None:
    sizes: set[int] = set()
    for (suite, loop), points in sorted(panel.series.items()):
        xs = sorted(points)
        sizes.update(xs)
        label = suite if loop == "-" else f"{suite} ({loop})"
        ax.plot(xs, [points[x] for x in xs], marker="o", linewidth=2, label=label)
    for (suite, name), points in sorted(panel.baselines.items()):
        xs = sorted(points)
        sizes.update(xs)
        style = {"linestyle": "--", "marker": "s"} if len(xs) > 1 else {"linestyle": "none"}
        ax.plot(
            xs,
            [points[x] for x in xs],
            markersize=8 if len(xs) == 1 else 5,
            alpha=0.8,
            label=f"{suite} baseline: {name}",
            **({"marker": "D"} | style),
        )
    for name, (size, value) in sorted(panel.references.items()):
        sizes.add(size)
        ax.plot([size], [value], linestyle="none", marker="x", markersize=9, label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_human(s) for s in ticks], rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("message size")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs message size (dashed/markers: same-run baselines)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def _draw_latency(ax: Any, rows: list[Result], formatter: Any) -> None:
    height = 0.38
    measured = [r.value * _TO_US[r.unit] for r in rows]
    with_base = [
        (y, r.baseline_value * _TO_US[r.unit])
        for y, r in enumerate(rows)
        if r.baseline_value is not None
    ]
    ax.barh([y - height / 2 for y in range(len(rows))], measured, height, label="measured")
    if with_base:
        ax.barh(
            [y + height / 2 for y, _ in with_base],
            [v for _, v in with_base],
            height,
            label="same-run baseline",
            alpha=0.6,
        )
    labels = [
        f"{r.suite}: {r.name}" + (f"\nvs {r.baseline_name}" if r.baseline_name else "")
        for r in rows
    ]
    ax.set_yticks(list(range(len(rows))))
    ax.set_yticklabels(labels, fontsize="x-small")
    ax.invert_yaxis()
    positive = [v for v in measured + [v for _, v in with_base] if v > 0]
    # Wake-ups (~10 us) and slow baselines (~1 ms) share an axis: go
    # logarithmic only when the spread needs it.
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(formatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel("µs (log scale)")
    else:
        ax.set_xlabel("µs")
    ax.set_title("Latency percentiles beside their baselines (shorter is better)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def plot_results(results: Sequence[Result], path: str) -> None:
    """Draw the throughput and latency figures of ``results`` into the PNG ``path``.

    Panels without data are left out (a ring-only run draws latency only);
    with nothing plottable at all the image says so instead of failing the
    run. Raises ImportError naming the ``plot`` extra if matplotlib is missing.
    """
    figure_cls, canvas_cls, formatter = _import_matplotlib()
    throughput = _throughput(results)
    latency = _latency(results)
    heights: list[float] = []
    if throughput:
        heights.append(5.0)
    if latency:
        heights.append(max(2.5, 0.45 * len(latency) + 1.2))
    fig = figure_cls(figsize=(11, sum(heights) if heights else 2.0), layout="constrained")
    canvas_cls(fig)
    if not heights:
        fig.text(0.5, 0.5, "no throughput or latency figures to plot", ha="center", va="center")
    else:
        axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
        panels = iter(axes)
        if throughput:
            _draw_throughput(next(panels), throughput)
        if latency:
            _draw_latency(next(panels), latency, formatter)
    fig.savefig(path, dpi=110, format="png")


# ----------------------------------------------------------------- re-plotting saved runs


def load_results(path: str) -> list[Result]:
    """Read the JSON that ``--json PATH`` wrote back into Result objects."""
    with open(path, encoding="utf-8") as fh:
        payload = json.load(fh)
    names = {f.name for f in fields(Result)}
    return [Result(**{k: v for k, v in item.items() if k in names}) for item in payload]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m aiokvpipe.bench.plot RESULTS.json OUT.png", file=sys.stderr)
        return 2
    plot_results(load_results(args[0]), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
