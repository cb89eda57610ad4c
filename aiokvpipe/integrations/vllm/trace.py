"""Per-request timing events of a vLLM decode, for the time-to-first-token breakdown.

Off unless ``AIOKVPIPE_VLLM_TRACE`` names a file: then every process of the
engine (API server, engine core, workers) appends one JSON line per event,
``{"t": wall-clock seconds, "pid": ..., "ev": name, "req": vLLM request id,
...}``. Wall-clock time, because the events of one request come from two or
three processes on one host; each line is one ``os.write`` on an
``O_APPEND`` descriptor, so lines of different processes never interleave.

The events (scheduler side unless noted):

* ``matched``: the scheduler first asked the connector about the request
  (it reached the engine core); ``tokens``, ``async``: the answer.
* ``alloc``: blocks were allocated for the external tokens.
* ``scheduled``: the request is in a step's ``scheduled_new_reqs`` (it will
  be computed in that step).
* ``step_out``: a step's output reached the scheduler (the first one after
  ``scheduled`` carries the request's first token).
* ``recv_done``: (async loads) the scheduler learnt the load ended.
* worker: ``load_start``/``load_end`` around the loading this step does
  before its forward; ``pull_start``/``pull_end`` around one aiokvpipe read
  on the agent's loop thread; ``layer_wait`` (``ms``) per layer wait that
  blocked; ``reported``: a finished async read reached vLLM.

:class:`TracedExampleConnector` is vLLM's ``ExampleConnector`` with the same
events, so both connectors are measured with one clock and one harness
(``examples/vllm_disagg/run.py --compare --trace``). Tracing costs a
``time.time()`` and a small write per event; it is for measurement, not for
production.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["TRACE_ENV", "enabled", "event", "scheduled_events"]

TRACE_ENV = "AIOKVPIPE_VLLM_TRACE"

_fd: int | None = None
_pid = 0


def enabled() -> bool:
    """Whether events are recorded in this process."""
    return bool(os.environ.get(TRACE_ENV))


def event(name: str, request_id: str = "", **fields: Any) -> None:
    """Append one event line (a no-op unless tracing is on)."""
    global _fd, _pid
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    now = time.time()
    pid = os.getpid()
    if _fd is None or _pid != pid:  # a forked child opens its own descriptor
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _pid = pid
    line = json.dumps({"t": now, "pid": pid, "ev": name, "req": request_id, **fields})
    os.write(_fd, (line + "\n").encode())


def scheduled_events(new_request_ids: Iterable[str]) -> None:
    """``scheduled`` for each request computed for the first time in this step."""
    if enabled():
        for rid in new_request_ids:
            event("scheduled", rid)


def _traced_example_connector() -> type:
    """vLLM's ExampleConnector with the events above (imports vLLM)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
        ExampleConnector,
        ExampleConnectorMetadata,
    )

    class TracedExampleConnector(ExampleConnector):  # type: ignore[misc]
        """ExampleConnector, unchanged, with the timing events of this module."""

        def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
            tokens, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
            if request.request_id not in self._traced:
                self._traced.add(request.request_id)
                event("matched", request.request_id, tokens=tokens, load_async=load_async)
            return tokens, load_async

        def update_state_after_alloc(
            self, request: Any, blocks: Any, num_external_tokens: int
        ) -> None:
            event("alloc", request.request_id, tokens=num_external_tokens)
            super().update_state_after_alloc(request, blocks, num_external_tokens)

        def build_connector_meta(self, scheduler_output: Any) -> Any:
            scheduled_events(r.req_id for r in scheduler_output.scheduled_new_reqs)
            return super().build_connector_meta(scheduler_output)

        def update_connector_output(self, connector_output: Any) -> None:
            event("step_out")
            super().update_connector_output(connector_output)

        def request_finished(self, request: Any, block_ids: Any) -> Any:
            self._traced.discard(request.request_id)
            return super().request_finished(request, block_ids)

        def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
            meta = self._get_connector_metadata()
            loads = (
                sum(not r.is_store for r in meta.requests)
                if isinstance(meta, ExampleConnectorMetadata)
                else 0
            )
            if loads:
                event("load_start", n=loads)
            super().start_load_kv(forward_context, **kwargs)
            if loads:
                event("load_end", n=loads)

        @property
        def _traced(self) -> set[str]:
            seen: set[str] | None = self.__dict__.get("_traced_ids")
            if seen is None:
                seen = self.__dict__["_traced_ids"] = set()
            return seen

    return TracedExampleConnector


def __getattr__(name: str) -> Any:
    # vLLM loads a connector class by attribute from kv_connector_module_path;
    # built on first access so that importing this module needs no vLLM.
    if name == "TracedExampleConnector":
        cls = _traced_example_connector()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
