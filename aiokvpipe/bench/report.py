"""Results and their presentation (table, JSON) shared by every benchmark."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


def human_size(size: int) -> str:
    """``size`` in the largest binary unit it reaches, rounded down: "4 KiB", "64 MiB"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


@dataclass
class Result:
    """One measured figure beside its same-run baseline.

    ``ratio`` is value / baseline_value; ``target`` says in words what the
    ratio (or value) must satisfy and ``ok`` whether it did (None: no target).
    """

    suite: str
    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def print_table(results: Sequence[Result], out: TextIO = sys.stdout) -> None:
    headers = (
        "suite",
        "figure",
        "value",
        "unit",
        "baseline",
        "baseline value",
        "ratio",
        "target",
        "ok",
    )
    rows = [
        (
            r.suite,
            r.name,
            _fmt(r.value),
            r.unit,
            r.baseline_name or "-",
            _fmt(r.baseline_value),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            {True: "yes", False: "NO", None: "-"}[r.ok],
        )
        for r in results
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)), file=out)


def write_json(results: Iterable[Result], path: str) -> None:
    payload = [r.as_dict() for r in results]
    if path == "-":
        json.dump(payload, sys.stdout, indent=2)
        print()
    else:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a tty)."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {what[:40]:<40}")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
