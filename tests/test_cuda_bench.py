"""The cuda benchmark suite where there is no GPU: it says so, and invents nothing."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from aiokvpipe.bench import cuda as cuda_bench
from aiokvpipe.bench.__main__ import main


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_bench, "cuda_available", lambda: False)


@pytest.mark.usefixtures("no_gpu")
def test_every_figure_is_reported_as_skipped() -> None:
    parser = argparse.ArgumentParser()
    cuda_bench.add_arguments(parser)
    args = parser.parse_args([])
    args.quick, args.loop = True, "both"
    results = cuda_bench.run(args)
    assert [r.name for r in results] == [
        f"{name} (skipped: no CUDA device)" for name in cuda_bench.FIGURES
    ]
    for r in results:
        assert math.isnan(r.value)  # no number where nothing was measured
        assert r.ok is None and r.baseline_value is None
        assert r.target == "skipped: no CUDA device"


@pytest.mark.usefixtures("no_gpu")
def test_cli_prints_the_skips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cuda", "--quick", "--json", "-"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped: no CUDA device") >= 2 * len(cuda_bench.FIGURES)
    rows = json.loads(out[out.index("[") :])
    assert {row["extra"]["skipped"] for row in rows} == {"no CUDA device"}
