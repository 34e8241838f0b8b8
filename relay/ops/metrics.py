"""Prometheus metrics over the workers' counters, aggregated in the supervisor.

Each worker ships `Server.stats()` snapshots to the supervisor (relay.process.worker.StatsReport). The
supervisor sums them over the live workers, plus the counters of workers that already exited
(`Aggregator.retire`), so a counter never goes backwards when a worker is restarted or a reload
retires a generation. Gauges (open connections, pipes in use...) only count live workers.

`RelayCollector` is a prometheus_client custom collector: it reads the supervisor's snapshot at
scrape time, nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["GAUGES", "Aggregator", "RelayCollector", "merge", "totals"]

# Keys of Server.stats() that are levels, not running counts (summed over live workers only).
GAUGES = frozenset({
    "conns_open", "pipes_in_use", "pipes_free", "pipes_max", "pipe_size_granted",
    "pipe_size_requested", "flows_open", "maxconn", "maxconn_per_source", "draining",
    "accept_paused_listeners", "conn_slots_used", "listeners", "listener_open",
    "egress_ports_in_use",
    # UDP (docs/udp.md)
    "udp_flows_open", "udp_pending_flows", "udp_pending_bytes", "udp_holds", "udp_max_flows",
    "udp_started", "udp_egress_ports_in_use",
})
# Gauges whose sum means nothing: the largest worker value is shown.
MAX_GAUGES = frozenset({"pipe_size_granted", "pipe_size_requested", "handoff_pause_max_seconds"})
HISTOGRAMS = frozenset({"connect_seconds", "handoff_pause_seconds"})


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _merge_histogram(into: dict[str, Any], h: dict[str, Any]) -> None:
    buckets: dict[str, float] = dict(into.get("buckets", []))
    for bound, count in h.get("buckets", []):
        buckets[str(bound)] = buckets.get(str(bound), 0) + count
    into["buckets"] = sorted(buckets.items(), key=lambda kv: float(kv[0]))
    into["sum"] = into.get("sum", 0.0) + float(h.get("sum", 0.0))
    into["count"] = into.get("count", 0) + int(h.get("count", 0))


def merge(into: dict[str, Any], stats: dict[str, Any], counters_only: bool = False) -> None:
    """Add one worker's `stats` into `into` (ints summed, {label: n} per label, histograms)."""
    for key, value in stats.items():
        if counters_only and key in GAUGES:
            continue
        if key in HISTOGRAMS and isinstance(value, dict):
            _merge_histogram(into.setdefault(key, {}), value)
        elif _is_number(value):
            if key in MAX_GAUGES:
                into[key] = max(into.get(key, 0), value)
            else:
                into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            sub = into.setdefault(key, {})
            for label, n in value.items():
                if _is_number(n):
                    sub[str(label)] = sub.get(str(label), 0) + n


def totals(workers: Iterable[dict[str, Any]], retired: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    """Sum of the live workers' stats (snapshot["workers"][i]["stats"]) plus `retired`."""
    out: dict[str, Any] = {}
    if retired:
        merge(out, retired)
    for w in workers:
        merge(out, w.get("stats", {}))
    return out


class Aggregator:
    """Keeps the counters of workers that exited, so totals stay monotonic."""

    def __init__(self) -> None:
        self._retired: dict[str, Any] = {}
        self.restarts = 0  # workers started again after one died
        self.reloads: dict[str, int] = {"ok": 0, "failed": 0}

    def retire(self, stats: dict[str, Any]) -> None:
        merge(self._retired, stats, counters_only=True)

    def retired_totals(self) -> dict[str, Any]:
        return self._retired


def _labelled(metric: CounterMetricFamily | GaugeMetricFamily, values: dict[str, Any]) -> None:
    for label, n in sorted(values.items()):
        metric.add_metric([label], n)


class RelayCollector(Collector):
    """Reads `snapshot()` (relay.process.supervisor.Supervisor.snapshot) at every scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], aggregator: Aggregator) -> None:
        self._snapshot = snapshot
        self._aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        workers = snap["workers"]
        t = totals(workers, snap.get("retired"))

        def counter(name: str, doc: str, key: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=t.get(key, 0))

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        states = GaugeMetricFamily("relay_workers", "Worker processes by state", labels=["state"])
        by_state: dict[str, int] = {"booting": 0, "serving": 0, "draining": 0}
        engines: dict[str, int] = {}
        for w in workers:
            by_state[w["state"]] = by_state.get(w["state"], 0) + 1
            if w["engine"]:
                engines[w["engine"]] = engines.get(w["engine"], 0) + 1
        _labelled(states, by_state)
        yield states
        engine = GaugeMetricFamily("relay_engine", "Workers running each I/O engine",
                                   labels=["engine"])
        _labelled(engine, engines)
        yield engine
        yield gauge("relay_generation", "Configuration generation being served",
                    snap["generation"])
        yield CounterMetricFamily("relay_worker_restarts", "Workers restarted after dying",
                                  value=snap.get("restarts", 0))
        reloads = CounterMetricFamily("relay_reloads", "Reloads by result", labels=["result"])
        _labelled(reloads, snap.get("reloads", {}))
        yield reloads

        open_ = GaugeMetricFamily("relay_connections_open", "Relayed connections open",
                                  labels=["listener"])
        _labelled(open_, t.get("listener_open", {}))
        yield open_
        total = CounterMetricFamily("relay_connections", "Relayed connections accepted",
                                    labels=["listener"])
        _labelled(total, t.get("listener_total", {}))
        yield total
        closes = CounterMetricFamily("relay_closes", "Connections ended, by reason",
                                     labels=["reason"])
        _labelled(closes, t.get("closed", {}))
        yield closes
        denied = CounterMetricFamily("relay_denied", "Clients reset before any upstream, by reason",
                                     labels=["reason"])
        _labelled(denied, t.get("denied", {}))
        yield denied
        rejected = CounterMetricFamily("relay_rejected", "Clients reset over a connection limit",
                                       labels=["limit"])
        _labelled(rejected, t.get("rejected", {}))
        yield rejected
        yield CounterMetricFamily("relay_slice_exhausted",
                                  "Connections refused: no free egress slice port",
                                  value=t.get("denied", {}).get("slice_exhausted", 0))
        yield gauge("relay_maxconn", "Connection limit over all live workers", t.get("maxconn", 0))
        yield counter("relay_flowlog_dropped",
                      "Flow log records dropped: the log destination did not keep up",
                      "flowlog_dropped")
        if snap.get("guard_dropped_packets") is not None:
            yield CounterMetricFamily(
                "relay_guard_dropped_packets",
                "Packets from a soft-unicast egress address with a source port outside this "
                "host's slice, dropped by the nft output guard (relay nft)",
                value=snap["guard_dropped_packets"])

        moved = CounterMetricFamily("relay_bytes", "Bytes relayed, by method",
                                    labels=["method"])
        moved.add_metric(["splice"], t.get("bytes_spliced", 0))
        moved.add_metric(["copy"], t.get("bytes_copied", 0))
        yield moved
        directions = {k[len("bytes_"):]: v for k, v in t.items()
                      if k in ("bytes_c2s", "bytes_s2c")}
        if directions:
            way = CounterMetricFamily("relay_direction_bytes",
                                      "Bytes relayed by direction (finished connections)",
                                      labels=["direction"])
            _labelled(way, directions)
            yield way

        pipes = GaugeMetricFamily("relay_pipes", "Splice pipes in the pools", labels=["state"])
        pipes.add_metric(["in_use"], t.get("pipes_in_use", 0))
        pipes.add_metric(["free"], t.get("pipes_free", 0))
        yield pipes
        yield counter("relay_pipes_created", "Splice pipes created", "pipes_created")
        yield counter("relay_pipe_refused", "Pipe requests refused (pool cap or kernel limit)",
                      "pipe_refused")
        yield gauge("relay_pipe_size_bytes", "Pipe size the kernel granted",
                    t.get("pipe_size_granted", 0))
        yield gauge("relay_iowq_threads", "io_uring worker threads (iou-wrk) of all workers",
                    sum(int(w.get("iowq_threads", 0)) for w in workers))

        slices = GaugeMetricFamily("relay_egress_ports_in_use",
                                   "Slice ports held, per egress address", labels=["address"])
        _labelled(slices, t.get("egress_ports_in_use", {}))
        yield slices

        yield counter("relay_accepts", "Connections accepted by the engines", "accepts")
        yield counter("relay_accept_errors", "accept() failures (EMFILE, ENFILE, ENOBUFS...)",
                      "accept_errors")
        yield counter("relay_accept_pauses", "Times accepting was paused after an accept error",
                      "accept_paused")
        yield gauge("relay_accept_paused_listeners", "Listeners paused right now (per worker)",
                    t.get("accept_paused_listeners", 0))

        yield from _udp_metrics(t)

        hist = t.get("connect_seconds")
        if hist and hist.get("buckets"):
            h = HistogramMetricFamily("relay_connect_seconds", "Upstream connect latency")
            h.add_metric([], [(str(b), c) for b, c in hist["buckets"]], hist.get("sum", 0.0))
            yield h

        from relay.ops.handoff_report import handoff_metrics

        yield from handoff_metrics(t)


def _udp_metrics(t: dict[str, Any]) -> Iterator[Metric]:
    """The UDP families (docs/udp.md), from the workers' udp_* stats."""
    yield GaugeMetricFamily("relay_udp_flows_open", "UDP flows open",
                            value=t.get("udp_flows_open", 0))
    yield CounterMetricFamily("relay_udp_flows", "UDP flows created",
                              value=t.get("udp_flows_total", 0))
    dgrams = CounterMetricFamily("relay_udp_datagrams", "UDP datagrams relayed, by direction",
                                 labels=["direction"])
    size = CounterMetricFamily("relay_udp_bytes", "UDP payload bytes relayed, by direction",
                               labels=["direction"])
    for way in ("c2s", "s2c"):
        dgrams.add_metric([way], t.get(f"udp_dgrams_{way}", 0))
        size.add_metric([way], t.get(f"udp_bytes_{way}", 0))
    yield dgrams
    yield size
    for name, doc, key, label in (
        ("relay_udp_drops", "UDP datagrams dropped, by reason", "udp_drops", "reason"),
        ("relay_udp_closes", "UDP flows ended, by reason", "udp_closed", "reason"),
        ("relay_udp_denied", "UDP flows refused before relaying, by reason", "udp_denied",
         "reason"),
    ):
        family = CounterMetricFamily(name, doc, labels=[label])
        _labelled(family, t.get(key, {}))
        yield family
    ports = GaugeMetricFamily("relay_udp_egress_ports_in_use",
                              "Slice ports held by UDP flows, per egress address",
                              labels=["address"])
    _labelled(ports, t.get("udp_egress_ports_in_use", {}))
    yield ports
