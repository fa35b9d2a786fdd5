"""Prometheus metrics of one daemon (``GET /metrics``, prometheus-client text format).

Counters and histograms follow the events every stream emits (``observe`` is called by the captions
hub for each event of every source: websocket ingest, the microphone); gauges and the batch-size
histograms are read from the daemon, its engine worker and its MQTT edge at scrape time. Labels stay
bounded: no stream ids, only the drop reason.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..core.guard import DROP_REASONS

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_OPEN_SEGMENTS_KEPT = 10_000  # speech_start times waiting for a first partial (bounded)


class Metrics:
    def __init__(self, daemon):
        self.daemon = daemon
        self.registry = registry = CollectorRegistry()
        self.segments = Counter("streamsed_segments", "Utterances the VAD closed (speech_end events)",
                                registry=registry)
        self.finals = Counter("streamsed_finals", "Finals sent with text (one per segment and target)",
                              registry=registry)
        self.partials = Counter("streamsed_partials", "Partials sent", registry=registry)
        self.final_lag = Histogram("streamsed_final_lag_seconds", "From the audio that closed a segment to "
                                   "its final (latency_ms)", buckets=LAG_BUCKETS, registry=registry)
        self.first_partial = Histogram("streamsed_first_partial_seconds", "From speech_start to the segment's "
                                       "first partial", buckets=LAG_BUCKETS, registry=registry)
        Gauge("streamsed_sessions_active", "Live streams (websocket ingest and microphone)",
              registry=registry).set_function(lambda: len(daemon.sessions))
        Gauge("streamsed_listeners_active", "Caption listeners connected",
              registry=registry).set_function(daemon.hub.listener_count)
        registry.register(_LiveCollector(daemon))
        self._started: dict[tuple[str, int], float] = {}  # (stream, segment) -> speech_start time

    def observe(self, event: dict) -> None:
        kind = event.get("type")
        key = (event.get("stream"), event.get("segment"))
        if kind == "speech_start":
            if len(self._started) >= _OPEN_SEGMENTS_KEPT:
                self._started.pop(next(iter(self._started)))
            self._started[key] = time.monotonic()
        elif kind == "speech_end":
            self.segments.inc()
        elif kind == "partial":
            self.partials.inc()
            started = self._started.pop(key, None)
            if started is not None:
                self.first_partial.observe(time.monotonic() - started)
        elif kind == "final":
            self._started.pop(key, None)
            if event.get("dropped"):  # counted once, by the hub (streamsed_dropped_total reads it)
                return
            self.finals.inc()
            if isinstance(event.get("latency_ms"), (int, float)):
                self.final_lag.observe(event["latency_ms"] / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector:
    """Engine and MQTT numbers, read when Prometheus scrapes."""

    def __init__(self, daemon):
        self.daemon = daemon

    def describe(self):
        return []  # values exist only once the model is loaded: collected at scrape time

    def collect(self):
        dropped = CounterMetricFamily("streamsed_dropped", "Finals the hallucination guard rejected", labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.daemon.hub.dropped.get(reason, 0))
        yield dropped
        worker = self.daemon.worker
        if worker is not None:
            stats = worker.stats
            uptime = max(time.monotonic() - worker.started_at, 1e-9)
            yield GaugeMetricFamily("streamsed_engine_busy_ratio", "Share of time the engine's lanes ran batches, "
                                    "since start", value=min(stats.busy_seconds / uptime / worker.lanes, 1.0))
            yield CounterMetricFamily("streamsed_engine_busy_seconds", "Seconds the engine ran batches, summed over "
                                      "its lanes (rate() of it / lanes is the busy ratio over any window)",
                                      value=stats.busy_seconds)
            yield GaugeMetricFamily("streamsed_engine_lanes", "Engine threads running batches in parallel",
                                    value=worker.lanes)
            yield GaugeMetricFamily("streamsed_engine_queue_depth", "Requests waiting for the engine",
                                    value=worker.queue_depth)
            yield _histogram("streamsed_encoder_batch_size", "Utterances per encoder pass", stats.encoder_batches)
            yield _histogram("streamsed_decoder_batch_rows", "Rows (utterance x target) per decode", stats.decoder_batches)
        for edge in self.daemon.edges:
            if hasattr(edge, "queued") and hasattr(edge, "stats") and hasattr(edge.stats, "dropped_partials"):
                yield GaugeMetricFamily("streamsed_mqtt_queue_depth", "MQTT messages not yet confirmed by the broker",
                                        value=edge.queued)
                dropped = CounterMetricFamily("streamsed_mqtt_dropped", "MQTT messages dropped", labels=["kind"])
                dropped.add_metric(["final"], edge.stats.dropped)
                dropped.add_metric(["partial"], edge.stats.dropped_partials)
                yield dropped


def _histogram(name: str, documentation: str, counts: dict[int, int]) -> HistogramMetricFamily:
    """A histogram from the worker's {batch size: batches} counts."""
    buckets = []
    for bound in BATCH_BUCKETS:
        cumulative = sum(n for size, n in counts.items() if size <= bound)
        buckets.append((str(bound), cumulative))
    total = sum(counts.values())
    buckets.append(("+Inf", total))
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], buckets, sum_value=sum(size * n for size, n in counts.items()))
    return family
