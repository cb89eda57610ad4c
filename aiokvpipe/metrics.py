"""Endpoint metrics: a transfer-latency histogram and an optional Prometheus collector.

``ep.stats()`` gives plain numbers per peer; :func:`prometheus_collector`
exposes the same as Prometheus metrics for ``prometheus_client`` (an
optional extra: ``pip install aiokvpipe[prometheus]``), imported only when
the collector is built::

    from prometheus_client import REGISTRY
    REGISTRY.register(prometheus_collector(ep))
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .endpoint import Endpoint

#: Upper bounds (seconds) of the latency buckets: 10 us .. 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0,
)  # fmt: skip


class LatencyHistogram:
    """Cumulative-ready bucket counts of send latency (accepted -> bytes left)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count), ...]`` as Prometheus histograms expose them, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip((*map(repr, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


def prometheus_collector(ep: Endpoint) -> Any:
    """A ``prometheus_client`` collector for ``ep`` (register it in a registry).

    Counters per peer and direction (``aiokvpipe_endpoint_bytes_total``,
    ``..._messages_total``), link errors per peer, peers up, and the send
    latency histogram ``aiokvpipe_endpoint_transfer_seconds``.
    """
    from prometheus_client.core import (  # optional extra, imported on use
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector

    class EndpointCollector(Collector):
        def collect(self) -> Iterator[Any]:
            labels = ["endpoint", "peer", "direction"]
            data = CounterMetricFamily(
                "aiokvpipe_endpoint_bytes", "Payload bytes moved per peer", labels=labels
            )
            messages = CounterMetricFamily(
                "aiokvpipe_endpoint_messages", "Messages moved per peer", labels=labels
            )
            errors = CounterMetricFamily(
                "aiokvpipe_endpoint_errors", "Link failures per peer", labels=["endpoint", "peer"]
            )
            up = GaugeMetricFamily(
                "aiokvpipe_endpoint_peer_up", "1 while a link to the peer is up", labels=labels[:2]
            )
            for address, st in ep.stats().items():
                data.add_metric([ep.name, address, "sent"], st.bytes_sent)
                data.add_metric([ep.name, address, "received"], st.bytes_received)
                messages.add_metric([ep.name, address, "sent"], st.messages_sent)
                messages.add_metric([ep.name, address, "received"], st.messages_received)
                errors.add_metric([ep.name, address], st.errors)
                up.add_metric([ep.name, address], 1.0 if st.state == "up" else 0.0)
            hist = HistogramMetricFamily(
                "aiokvpipe_endpoint_transfer_seconds",
                "Time from send() accepting a tensor to its bytes leaving",
                labels=["endpoint"],
            )
            h = ep.latency
            hist.add_metric([ep.name], [(le, float(n)) for le, n in h.cumulative()], h.total)
            yield from (data, messages, errors, up, hist)

    return EndpointCollector()
