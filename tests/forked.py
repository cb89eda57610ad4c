"""A ``subprocess.Popen`` look-alike for test peers, forked from the preloaded worker server.

The process tests used to start their peers as ``python script.py`` or
``python -c CODE``: a fresh interpreter that spends ~2 s of CPU importing
torch before its first line, which on a 2-core CI machine was a large share
of the suite. :class:`Forked` runs the same script or code, with the same
``sys.argv``, ``__name__ == "__main__"`` and standard streams, in a child of
the fork server that already imported torch and aiokvpipe
(:func:`aiokvpipe.bench.procs.worker_context`). It is still a separate,
killable process with its own pid, so SIGKILL/SIGSTOP tests mean the same.

Only what the tests use is provided: ``stdin``/``stdout``/``stderr`` as
``subprocess.PIPE`` or ``subprocess.DEVNULL`` (or inherited), text or bytes,
``pid``, ``poll``, ``wait``, ``communicate``, ``send_signal``, ``kill``,
``returncode``.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import IO, Any

from aiokvpipe.bench.procs import worker_context


def _main(argv: list[str], code: str | None, streams: list[Connection | int | None]) -> None:
    """The child: wire fds 0-2 to the parent's pipes, then run the script as __main__."""
    for fd, stream in enumerate(streams):
        if isinstance(stream, Connection):
            os.dup2(stream.fileno(), fd)
            stream.close()
        elif stream == subprocess.DEVNULL:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = list(argv)
    if code is not None:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        runpy.run_path(argv[0], run_name="__main__")


class Forked:
    """``Popen([python, script, *args])`` or ``Popen([python, "-c", code, *args])``, forked."""

    def __init__(
        self,
        args: list[str],
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        text: bool = False,
    ) -> None:
        if not args or args[0] != sys.executable:
            raise ValueError(f"Forked runs Python scripts, not {args[:1]}")
        if args[1] == "-c":
            code: str | None = args[2]
            argv = ["-c", *args[3:]]
        else:
            code, argv = None, list(args[1:])
        ctx = worker_context()
        child_ends: list[Connection | int | None] = []
        ours: list[Connection | None] = []
        for fd, how in enumerate((stdin, stdout, stderr)):
            if how == subprocess.PIPE:
                reader, writer = ctx.Pipe(duplex=False)
                child_ends.append(reader if fd == 0 else writer)
                ours.append(writer if fd == 0 else reader)
            else:
                child_ends.append(how)
                ours.append(None)
        self._process = ctx.Process(target=_main, args=(argv, code, child_ends), daemon=True)
        self._process.start()
        for end in child_ends:
            if isinstance(end, Connection):
                end.close()
        self.pid = self._process.pid
        self.stdin: IO[Any] | None = self._file(ours[0], "w", text)
        self.stdout: IO[Any] | None = self._file(ours[1], "r", text)
        self.stderr: IO[Any] | None = self._file(ours[2], "r", text)
        self.returncode: int | None = None

    @staticmethod
    def _file(conn: Connection | None, mode: str, text: bool) -> IO[Any] | None:
        if conn is None:
            return None
        fd = os.dup(conn.fileno())
        conn.close()
        return os.fdopen(fd, mode if text else mode + "b", buffering=-1 if text else 0)

    def poll(self) -> int | None:
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
            self._process.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._process.join(timeout)
            if self.poll() is None:
                raise subprocess.TimeoutExpired(repr(self), timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: Any = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Feed ``input``, close stdin, read both outputs to EOF, and wait."""
        got: dict[str, Any] = {}

        def drain(name: str, stream: IO[Any]) -> None:
            got[name] = stream.read()

        readers = [
            threading.Thread(target=drain, args=(name, stream), daemon=True)
            for name, stream in (("out", self.stdout), ("err", self.stderr))
            if stream is not None
        ]
        for thread in readers:
            thread.start()
        if self.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                if input:
                    self.stdin.write(input)
                self.stdin.close()
        for thread in readers:
            thread.join(timeout)
            if thread.is_alive():
                raise subprocess.TimeoutExpired(repr(self), timeout or 0.0)
        self.wait(timeout)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return got.get("out"), got.get("err")

    def __repr__(self) -> str:
        return f"Forked(pid={self.pid}, returncode={self.returncode})"
