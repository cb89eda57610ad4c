"""The one place that decides whether CUDA, cupy and NCCL are usable.

Every GPU code path asks here first, so a CPU-only install fails with the same
typed error (:class:`~aiokvpipe.errors.CudaUnavailableError`) and the same
install hint wherever it is touched, and nothing imports cupy until a CUDA
transport is actually chosen. cupy prints a ``UserWarning`` when it cannot load
NCCL; that would be an error under ``-W error``, and the condition is reported
through our own exception anyway, so those imports run with warnings muted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import AiokvpipeError, CudaTransferError, CudaUnavailableError

INSTALL_HINT = "pip install 'aiokvpipe[cuda12]'"


def cuda_available() -> bool:
    """True when torch can run CUDA work in this process (never raises)."""
    try:
        return bool(torch.version.cuda is not None and torch.cuda.is_available())
    except Exception:  # broken driver installs raise from is_available()
        return False


def require_cuda(what: str, device: str | torch.device | None = None) -> torch.device:
    """Check that ``what`` can run on ``device`` and return it with its index filled in.

    ``"cuda"`` without an index means the current device, as in torch.
    """
    if torch.version.cuda is None:
        raise CudaUnavailableError(
            f"{what} needs CUDA, but this torch build ({torch.__version__}) has no CUDA "
            f"support; install a CUDA build of torch, then {INSTALL_HINT}"
        )
    if not cuda_available():
        raise CudaUnavailableError(
            f"{what} needs a CUDA GPU, but torch sees none (no driver, or "
            f"CUDA_VISIBLE_DEVICES hides them all)"
        )
    resolved = torch.device("cuda" if device is None else device)
    if resolved.type != "cuda":
        raise CudaUnavailableError(f"{what} needs a CUDA device, not {resolved}")
    index: int | None = resolved.index  # torch's stubs call it int; "cuda" gives None
    if index is None:
        index = torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise CudaUnavailableError(
            f"{what} asks for {resolved}, but only {count} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def require_usable_device(device: str, transport: str) -> None:
    """Fail now, before any waiting for peers, if ``device``/``transport`` cannot work here.

    What ``Pipe.connect`` and ``Endpoint.start`` call first: a CUDA device
    needs a CUDA build of torch that sees it; ``transport="nccl"`` also needs
    cupy and the NCCL library, ``"cuda_ipc"`` cupy. (``"auto"`` may pick tcp
    for a CPU peer, which needs neither, so it asks only for the device.)
    Raises CudaUnavailableError with the install hint; cupy is imported only
    when a GPU transport is named.
    """
    if not device.startswith("cuda"):
        return  # the config already refuses a GPU transport on a CPU device
    what = f"device={device!r}, transport={transport!r}"
    require_cuda(what, device)
    if transport == "nccl":
        nccl_or_raise(what)
    elif transport == "cuda_ipc":
        cupy_or_raise(what)


def cupy_or_raise(what: str) -> Any:
    """Import cupy for ``what``, or say exactly what to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy
    except (ImportError, OSError, RuntimeError) as exc:
        raise CudaUnavailableError(
            f"{what} needs cupy, which cannot be imported ({exc}); {INSTALL_HINT}"
        ) from exc
    return cupy


def nccl_or_raise(what: str) -> Any:
    """cupy's NCCL bindings (``cupy.cuda.nccl``), or a CudaUnavailableError saying why not."""
    cupy_or_raise(what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except (ImportError, OSError, RuntimeError) as exc:
        raise CudaUnavailableError(
            f"{what} needs cupy's NCCL bindings ({exc}); {INSTALL_HINT}"
        ) from exc
    if not getattr(nccl, "available", False):
        raise CudaUnavailableError(
            f"{what} needs the NCCL library, which cupy could not load; "
            f"pip install nvidia-nccl-cu12 (or {INSTALL_HINT})"
        )
    return nccl


@contextmanager
def cuda_errors(what: str) -> Iterator[None]:
    """Translate CUDA, cupy and NCCL failures inside the block into CudaTransferError.

    torch, cupy (``CUDARuntimeError``, ``CUDADriverError``) and NCCL
    (``NcclError``) all report device failures as ``RuntimeError``
    subclasses; our own errors (some of which are RuntimeErrors too) pass
    through untouched.
    """
    try:
        yield
    except AiokvpipeError:
        raise
    except RuntimeError as exc:
        raise CudaTransferError(f"{what}: {exc}") from exc
