"""tools/gpu_check.py where there is no GPU, and its report from canned results."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def test_no_gpu_says_so_in_one_line_and_fails() -> None:
    """Run as nox runs it, in a plain Python: nothing else is printed, and it is no pass."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == gpu_check.EXIT_NO_GPU
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: ")
    assert "nothing was tested" in lines[0]


def test_cpu_torch_beside_a_driver_is_reported_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_check, "probe_driver", lambda: gpu_check.Driver(1, "12.4", ["GPU"]))
    monkeypatch.setattr(gpu_check, "driver_release", lambda: "550.54")
    monkeypatch.setattr("torch.version.cuda", None)
    assert gpu_check.main([]) == gpu_check.EXIT_NO_GPU
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "CPU build" in out[0]


JUNIT_OK = """<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda_gpu" name="test_staging_round_trip[asyncio]" time="0.1"/>
<testcase classname="tests.test_cuda_gpu" name="test_nccl_grouped_self_send_recv[uvloop]"/>
</testsuite></testsuites>"""

JUNIT_SKIP = JUNIT_OK.replace(
    '<testcase classname="tests.test_cuda_gpu" name="test_nccl_grouped_self_send_recv[uvloop]"/>',
    '<testcase classname="tests.test_cuda_gpu" name="test_nccl_pipe_on_two_gpus[asyncio]">'
    '<skipped type="pytest.skip" message="needs two GPUs">skip</skipped></testcase>',
)


def _row(name: str, value: float, unit: str, ok: bool | None, **extra: Any) -> dict[str, Any]:
    return {
        "suite": "cuda",
        "name": name,
        "value": value,
        "unit": unit,
        "baseline_name": extra.pop("baseline_name", ""),
        "baseline_value": extra.pop("baseline_value", None),
        "target": extra.pop("target", ""),
        "ok": ok,
        "extra": extra,
        "ratio": extra.pop("ratio", None),
    }


BENCH = [
    _row(
        "event-await overhead, 20 us kernel (asyncio)",
        6.5,
        "us",
        True,
        baseline_name="synchronize() latency",
        baseline_value=24.0,
        target="<= 20 us over synchronize()",
    ),
    _row(
        "NCCL grouped self send/recv 256 MiB",
        310.0,
        "GB/s",
        None,
        baseline_name="device-to-device copy",
        baseline_value=1900.0,
        ratio=0.163,
    ),
    _row(
        "CUDA IPC two processes 256 MiB (asyncio)",
        1700.0,
        "GB/s",
        True,
        baseline_name="device-to-device copy (wall)",
        baseline_value=1900.0,
        ratio=0.89,
        target=">= 80% of device-to-device",
    ),
    _row(
        "loop lag p99 during 1 GiB NCCL self send/recv (asyncio)",
        0.4,
        "ms",
        True,
        target="<= 2 ms",
    ),
]


def _report(junit: str, rows: list[dict[str, Any]]) -> Any:
    report = gpu_check.Report(
        driver=gpu_check.Driver(1, "13.0", ["NVIDIA H200"]),
        release="580.159.04",
        versions={"torch": "2.13.0+cu128 (CUDA 12.8)", "cupy": "13.6.0", "nccl": "2.27.7"},
    )
    report.tests = gpu_check.summarize_junit(junit)
    report.figures = gpu_check.bench_figures(rows)
    return report


def test_report_of_a_clean_run() -> None:
    report = _report(JUNIT_OK, BENCH)
    text = report.render()
    assert report.exit_code() == gpu_check.EXIT_OK
    assert "1 x NVIDIA H200; driver 580.159.04 (CUDA 13.0)" in text
    assert "torch 2.13.0+cu128 (CUDA 12.8), cupy 13.6.0, NCCL 2.27.7" in text
    assert "2 passed, 0 failed, 0 errors, 0 skipped" in text
    assert "ok   event-await overhead, 20 us kernel (asyncio): 6.5 us" in text
    assert "target <= 20 us over synchronize()" in text
    assert "NCCL grouped self send/recv 256 MiB: 310 GB/s (device-to-device copy 1.9e+03" in text
    assert "89%" in text and "result: PASS" in text


def test_any_skipped_test_fails_the_check() -> None:
    report = _report(JUNIT_SKIP, BENCH)
    assert report.exit_code() == gpu_check.EXIT_FAILED
    text = report.render()
    assert "1 passed, 0 failed, 0 errors, 1 skipped" in text
    assert "SKIPPED test_nccl_pipe_on_two_gpus[asyncio]: needs two GPUs" in text
    assert "result: FAIL" in text


def test_no_tests_at_all_fails_the_check() -> None:
    report = _report("<testsuites><testsuite/></testsuites>", BENCH)
    assert report.exit_code() == gpu_check.EXIT_FAILED


def test_a_missed_target_and_a_skipped_figure() -> None:
    missed = [dict(row) for row in BENCH]
    missed[2] = {**missed[2], "value": 900.0, "ratio": 0.47, "ok": False}
    report = _report(JUNIT_OK, missed)
    assert report.exit_code() == gpu_check.EXIT_TARGETS
    assert "MISS CUDA IPC two processes" in report.render()
    skipped = [*BENCH, _row("NCCL (skipped: NCCL unavailable)", float("nan"), "", None)]
    skipped[-1]["extra"] = {"skipped": "NCCL unavailable"}
    report = _report(JUNIT_OK, skipped)
    assert report.exit_code() == gpu_check.EXIT_FAILED
    assert "not measured" in report.render()
