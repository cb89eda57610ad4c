"""Prove the GPU paths on this machine: every ``cuda`` test, then the GPU benchmark.

``python -m nox -s gpu-check`` installs the CUDA builds and runs this; on a
machine whose Python already holds a CUDA torch, cupy, pytest and
pytest-asyncio, run it directly from the repository root::

    python tools/gpu_check.py            # tests + bench + report
    python tools/gpu_check.py --no-bench # tests only (what ``nox -s gpu`` runs)
    python tools/gpu_check.py --probe    # is there a GPU at all? (stdlib only)

It prints a short report: GPU model and driver, torch/cupy/NCCL versions,
tests passed/failed/skipped, and each benchmark figure beside its target.
Exit status: 0 all passed and every target met; 1 a test failed, errored or
was skipped (any skip fails: a skipped GPU test proves nothing), no test
ran, or the benchmark failed; 2 no usable GPU, or this Python cannot use
it (one line says which); 3 the tests passed but a benchmark target was
missed.

Only the standard library is imported at module level, so ``--probe`` runs
in a bare virtual environment before anything is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTEST_SECONDS = 240  # the cuda tests take about a minute on one GPU
BENCH_SECONDS = 180  # the cuda bench about one to two
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU, EXIT_TARGETS = 0, 1, 2, 3


class NoGpu(Exception):
    """This machine or this Python cannot run the GPU tests (the message says why)."""


# ----------------------------------------------------------------- probing


@dataclass
class Driver:
    count: int
    version: str  # "13.0": the CUDA version the driver supports
    names: list[str]


def probe_driver() -> Driver:
    """Ask the CUDA driver (libcuda, through ctypes) how many GPUs it sees."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise NoGpu(f"no NVIDIA driver (libcuda.so.1: {exc})") from exc
    status = libcuda.cuInit(0)
    if status != 0:
        raise NoGpu(f"the NVIDIA driver does not initialise (cuInit: CUresult {status})")
    count, version = ctypes.c_int(), ctypes.c_int()
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise NoGpu("the NVIDIA driver sees no GPU (or CUDA_VISIBLE_DEVICES hides them)")
    libcuda.cuDriverGetVersion(ctypes.byref(version))
    names = []
    for index in range(count.value):
        device, name = ctypes.c_int(), ctypes.create_string_buffer(256)
        libcuda.cuDeviceGet(ctypes.byref(device), index)
        libcuda.cuDeviceGetName(name, 256, device)
        names.append(name.value.decode(errors="replace"))
    major, minor = divmod(version.value // 10, 100)
    return Driver(count.value, f"{major}.{minor}", names)


def driver_release() -> str:
    """The driver's release number (580.x), which only nvidia-smi or /proc tell."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def probe_python() -> dict[str, str]:
    """Versions, after checking this Python can use the GPU from torch and cupy."""
    try:
        import torch
    except ImportError as exc:
        raise NoGpu(f"torch is not installed in {sys.executable}") from exc
    if torch.version.cuda is None:
        raise NoGpu(f"torch {torch.__version__} is a CPU build: install a CUDA build")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise NoGpu(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
            "is the driver older than that CUDA?"
        )
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        raise NoGpu(f"cupy cannot be imported ({exc}): pip install 'aiokvpipe[cuda12]'") from exc
    try:
        cupy_devices = int(cupy.cuda.runtime.getDeviceCount())
        cupy_runtime = str(cupy.cuda.runtime.runtimeGetVersion())
    except Exception as exc:
        raise NoGpu(f"cupy {cupy.__version__} cannot reach the GPU ({exc})") from exc
    if cupy_devices < 1:
        raise NoGpu(f"cupy {cupy.__version__} sees no GPU")
    for module in ("pytest", "pytest_asyncio"):
        try:
            __import__(module)
        except ImportError as exc:
            raise NoGpu(f"{module} is not installed: pip install -e '.[test]'") from exc
    try:
        from cupy.cuda import nccl

        raw = int(nccl.get_version()) if getattr(nccl, "available", False) else 0
        nccl_version = (
            f"{raw // 10000}.{raw // 100 % 100}.{raw % 100}" if raw >= 10000 else "missing"
        )
    except Exception:
        nccl_version = "missing"
    return {
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "cupy": f"{cupy.__version__} (runtime {cupy_runtime})",
        "nccl": nccl_version,
        "devices": str(torch.cuda.device_count()),
    }


# ----------------------------------------------------------------- results


@dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    not_passed: list[str] = field(default_factory=list)  # "SKIPPED test_x: reason"

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped


def summarize_junit(xml_text: str) -> TestCounts:
    """Count a pytest junit report's outcomes, naming every test that did not pass."""
    counts = TestCounts()
    for case in ET.fromstring(xml_text).iter("testcase"):
        name = case.get("name", "?")
        outcome = next(
            (child for child in case if child.tag in ("failure", "error", "skipped")), None
        )
        if outcome is None:
            counts.passed += 1
            continue
        reason = (outcome.get("message") or "").strip().splitlines()
        label = {"failure": "FAILED", "error": "ERROR", "skipped": "SKIPPED"}[outcome.tag]
        counts.not_passed.append(f"{label} {name}: {reason[0] if reason else ''}".rstrip(": "))
        if outcome.tag == "failure":
            counts.failed += 1
        elif outcome.tag == "error":
            counts.errors += 1
        else:
            counts.skipped += 1
    return counts


@dataclass
class Figure:
    name: str
    line: str
    ok: bool | None  # None: no target (reported only)
    measured: bool = True  # False: the bench skipped it, which fails the check


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.{digits}g}"


def bench_figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """The bench's JSON rows as report lines beside their targets."""
    figures = []
    for row in rows:
        name, unit = str(row.get("name", "?")), str(row.get("unit", ""))
        extra = row.get("extra") or {}
        if "skipped" in extra:
            figures.append(Figure(name, f"{name}: not measured", False, measured=False))
            continue
        value = f"{_num(row.get('value'))} {unit}"
        baseline = row.get("baseline_name") or ""
        if baseline:
            value += f" ({baseline} {_num(row.get('baseline_value'))} {unit}"
            ratio = row.get("ratio")
            value += f", {float(ratio):.0%})" if ratio is not None else ")"
        target = row.get("target") or "no target"
        figures.append(Figure(name, f"{name}: {value}; target {target}", row.get("ok")))
    return figures


@dataclass
class Report:
    driver: Driver | None = None
    release: str = "?"
    versions: dict[str, str] = field(default_factory=dict)
    tests: TestCounts | None = None
    tests_seconds: float = 0.0
    tests_problem: str = ""  # pytest crashed, timed out, or wrote no report
    figures: list[Figure] = field(default_factory=list)
    bench_seconds: float = 0.0
    bench_problem: str = ""
    bench_wanted: bool = True

    def exit_code(self) -> int:
        tests = self.tests
        if (
            self.tests_problem
            or tests is None
            or tests.total == 0
            or tests.failed
            or tests.errors
            or tests.skipped
        ):
            return EXIT_FAILED
        if self.bench_wanted and (
            self.bench_problem or not self.figures or not all(f.measured for f in self.figures)
        ):
            return EXIT_FAILED
        if any(f.ok is False for f in self.figures):
            return EXIT_TARGETS
        return EXIT_OK

    def render(self) -> str:
        lines = []
        if self.driver is not None:
            gpus = ", ".join(sorted(set(self.driver.names)))
            lines.append(
                f"gpu-check: {self.driver.count} x {gpus}; driver {self.release} "
                f"(CUDA {self.driver.version})"
            )
        if self.versions:
            v = self.versions
            lines.append(f"  torch {v['torch']}, cupy {v['cupy']}, NCCL {v['nccl']}")
        if self.tests is not None:
            t = self.tests
            lines.append(
                f"  tests (-m cuda): {t.passed} passed, {t.failed} failed, {t.errors} errors, "
                f"{t.skipped} skipped in {self.tests_seconds:.0f} s"
            )
            lines.extend(f"    {line}" for line in t.not_passed)
        if self.tests_problem:
            lines.append(f"  tests: {self.tests_problem}")
        if self.bench_wanted:
            lines.append(f"  bench (python -m aiokvpipe.bench cuda), {self.bench_seconds:.0f} s:")
            for figure in self.figures:
                mark = {True: "ok  ", False: "MISS", None: "    "}[figure.ok]
                lines.append(f"    {mark} {figure.line}")
            if self.bench_problem:
                lines.append(f"    {self.bench_problem}")
        verdict = {
            EXIT_OK: "PASS",
            EXIT_FAILED: "FAIL (a test failed, errored or was skipped; or the bench broke or "
            "skipped a figure)",
            EXIT_TARGETS: "FAIL (tests passed; a benchmark target was missed)",
        }[self.exit_code()]
        lines.append(f"  result: {verdict}")
        return "\n".join(lines)


# ----------------------------------------------------------------- running


def _child_env() -> dict[str, str]:
    """Children import this checkout's aiokvpipe even where it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_tests(report: Report, workdir: Path, pytest_args: list[str]) -> None:
    junit = workdir / "cuda-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rs",
        f"--junitxml={junit}",
        *(pytest_args or [str(ROOT / "tests")]),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=PYTEST_SECONDS,
        )
    except subprocess.TimeoutExpired:
        report.tests_problem = f"pytest did not finish in {PYTEST_SECONDS} s"
        return
    finally:
        report.tests_seconds = time.monotonic() - started
    if junit.is_file():
        report.tests = summarize_junit(junit.read_text())
    if report.tests is None or done.returncode not in (0, 1):
        report.tests_problem = (
            f"pytest exited {done.returncode}:\n{_tail(done.stdout + done.stderr)}"
        )


def run_bench(report: Report, workdir: Path) -> None:
    out = workdir / "cuda-bench.json"
    command = [sys.executable, "-m", "aiokvpipe.bench", "cuda", "--json", str(out)]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            text=True,
            timeout=BENCH_SECONDS,
        )
    except subprocess.TimeoutExpired:
        report.bench_problem = f"the bench did not finish in {BENCH_SECONDS} s"
        return
    finally:
        report.bench_seconds = time.monotonic() - started
    if done.returncode != 0 or not out.is_file():
        report.bench_problem = f"bench exited {done.returncode}:\n{_tail(done.stderr)}"
        return
    report.figures = bench_figures(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="only check for a GPU (stdlib)")
    parser.add_argument("--no-bench", action="store_true", help="run the tests only")
    parser.add_argument("--keep", metavar="DIR", help="keep the junit and bench JSON there")
    parser.add_argument("pytest_args", nargs="*", help="instead of tests/ (after --)")
    args = parser.parse_args(argv)
    report = Report(bench_wanted=not args.no_bench)
    try:
        report.driver = probe_driver()
        if args.probe:
            return EXIT_OK
        report.release = driver_release()
        report.versions = probe_python()
    except NoGpu as exc:
        print(f"gpu-check: {exc}; nothing was tested", flush=True)
        return EXIT_NO_GPU
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        run_tests(report, workdir, args.pytest_args)
        if report.bench_wanted:
            run_bench(report, workdir)
    print(report.render(), flush=True)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main())
