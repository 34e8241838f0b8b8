"""Medians over rounds, per-round ratios against the references, and the issue's goals."""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.contenders import (
    DIRECT,
    EMBEDDED,
    EMBEDDED_SERVE,
    HAPROXY,
    NGINX,
    SCALING,
    SPLICE_FLOOR,
    STREAMS,
    UVLOOP,
)

# metric -> (value key, unit label, higher is better); the last column is the load of other
# processes during the run (bench/drivers/foreign.py): a lucky or unlucky contender shows there.
OTHER_LOAD = ("foreign_cpus", "other load, CPUs", False)
VALUES: dict[str, list[tuple[str, str, bool]]] = {
    "stream1": [("gbit_s", "Gbit/s", True), ("cpu_s_per_gb", "CPU-s/GB", False), OTHER_LOAD],
    "stream8": [("gbit_s", "Gbit/s", True), ("cpu_s_per_gb", "CPU-s/GB", False), OTHER_LOAD],
    "rr": [("rps", "req/s", True), ("p50_us", "p50 us", False), ("p99_us", "p99 us", False),
           ("cpu_us_per_req", "CPU-us/req", False), OTHER_LOAD],
    **{m: [("dgram_s", "dgram/s", True), ("loss_pct", "loss %", False),
           ("cpu_s_per_mdgram", "CPU-s/M dgram", False), ("offered_s", "sent/s", True), OTHER_LOAD]
       for m in ("udp64", "udp1200", "udpflows")},
    "latency": [("p50_us", "p50 us", False), ("p99_us", "p99 us", False), ("p99.9_us", "p99.9 us", False),
                ("msg_s", "msg/s", True), OTHER_LOAD],
    "connrate": [("conn_s", "conn/s", True), ("p50_us", "p50 us", False), ("p99_us", "p99 us", False),
                 ("cpu_us_per_conn", "CPU-us/conn", False), ("error_pct", "errors %", False),
                 ("worker_share_max", "busiest worker", False), OTHER_LOAD],
}
REFERENCES = (DIRECT, HAPROXY, STREAMS, NGINX, UVLOOP, SPLICE_FLOOR)  # ratios are computed against each of these
UDP_METRICS = ("udp64", "udp1200", "udpflows")


def ratio_columns(metric: str) -> tuple[str, ...]:
    """The references a metric's table shows ratios against."""
    return (DIRECT, NGINX) if metric in UDP_METRICS else (DIRECT, HAPROXY, STREAMS)
METRIC_TITLES = {"stream1": "single stream (iperf3)", "stream8": "8 streams (iperf3 -P 8)",
                 "rr": "request/response",
                 "udp64": "UDP 64-byte datagrams", "udp1200": "UDP 1,200-byte datagrams (QUIC-sized)",
                 "udpflows": "UDP new flows (a new source address per 64-byte datagram)",
                 "latency": "ping-pong latency (sockperf TCP, 64 B, pinned with taskset)",
                 "connrate": "connection rate (wrk, Connection: close, nginx origin)"}


def finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _median(values: list[float]) -> float | None:
    good = finite(values)
    return statistics.median(good) if good else None


def summarize(batch: dict[str, Any]) -> dict[str, Any]:
    """metric -> contender -> {key: {median, rounds, errors, ratio: {ref: {median, rounds}}}}."""
    summary: dict[str, Any] = {}
    for metric, values in VALUES.items():
        per_contender: dict[str, Any] = {}
        for name in batch["contenders"]:
            rows = [r["results"].get(metric, {}).get(name) for r in batch["rounds"]]
            rows = [row for row in rows if row is not None]
            if not rows:
                continue
            entry: dict[str, Any] = {"errors": [row["error"] for row in rows if "error" in row]}
            for key, _, _ in values:
                series = [row.get(key, math.nan) for row in rows if "error" not in row]
                ratios: dict[str, Any] = {}
                for ref in REFERENCES:
                    per_round = []
                    for r in batch["rounds"]:
                        mine = r["results"].get(metric, {}).get(name, {})
                        theirs = r["results"].get(metric, {}).get(ref, {})
                        a, b = mine.get(key), theirs.get(key)
                        if finite([a, b]) == [a, b] and b:
                            per_round.append(a / b)
                    ratios[ref] = {"median": _median(per_round), "rounds": per_round}
                entry[key] = {"median": _median(series), "rounds": series, "ratio": ratios}
            per_contender[name] = entry
        summary[metric] = per_contender
    return summary


SCALING_METRICS = {"stream8": "gbit_s", "connrate": "conn_s"}


def scaling(batch: dict[str, Any]) -> dict[str, Any]:
    """--workers 2 over --workers 1 (SCALING), per metric: medians of both and of the per-round ratios."""
    one, two = SCALING
    out: dict[str, Any] = {}
    for metric, key in SCALING_METRICS.items():
        rows = [r["results"].get(metric, {}) for r in batch["rounds"]]
        pairs = [(r.get(one, {}).get(key), r.get(two, {}).get(key)) for r in rows]
        pairs = [(a, b) for a, b in pairs if finite([a, b]) == [a, b] and a]
        if not pairs:
            continue
        out[metric] = {"key": key, "one": _median([a for a, _ in pairs]), "two": _median([b for _, b in pairs]),
                       "ratio": {"median": _median([b / a for a, b in pairs]), "rounds": [b / a for a, b in pairs]}}
    return out


FLOOR_METRICS = ("stream1", "stream8")


def floor_rows(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """metric -> contender -> CPU-s/GB and throughput against the splice floor of the same rounds."""
    out: dict[str, dict[str, Any]] = {}
    for metric in FLOOR_METRICS:
        rows = summary.get(metric, {})
        if SPLICE_FLOOR not in rows:
            continue
        out[metric] = {
            name: {"cpu_s_per_gb": entry["cpu_s_per_gb"]["median"],
                   "cpu": entry["cpu_s_per_gb"]["ratio"][SPLICE_FLOOR],
                   "gbit": entry["gbit_s"]["ratio"][SPLICE_FLOOR]}
            for name, entry in rows.items()
            if name not in (DIRECT, SPLICE_FLOOR) and entry["cpu_s_per_gb"]["ratio"][SPLICE_FLOOR]["rounds"]
        }
    return out


def targets(summary: dict[str, Any], idle: dict[str, Any], contenders: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, checked for every relay engine from this batch's medians."""

    def ratio(metric: str, name: str, key: str, ref: str) -> float | None:
        try:
            value = summary[metric][name][key]["ratio"][ref]["median"]
        except KeyError:
            return None
        return float(value) if value is not None else None

    def median(metric: str, name: str, key: str) -> float | None:
        try:
            value = summary[metric][name][key]["median"]
        except KeyError:
            return None
        return float(value) if value is not None else None

    checks: list[dict[str, Any]] = []
    for name, info in contenders.items():
        if name in (EMBEDDED, EMBEDDED_SERVE):  # issue 8: embedding costs no more than the plain uvloop Protocol proxy
            value = ratio("connrate", name, "conn_s", UVLOOP)
            checks.append({"contender": name, "goal": "conn/s x uvloop-protocol", "value": value, "op": ">=",
                           "limit": 1.0, "ok": None if value is None else value >= 1.0})
        if info["kind"] != "relay":
            continue
        idle_row = idle.get(name, {})
        goals: list[tuple[str, float | None, str, float]] = [
            ("1 stream x uvloop-protocol", ratio("stream1", name, "gbit_s", UVLOOP), ">=", 1.05),
            ("1 stream x HAProxy", ratio("stream1", name, "gbit_s", HAPROXY), ">=", 1.0),
            ("1 stream x asyncio-streams", ratio("stream1", name, "gbit_s", STREAMS), ">=", 3.0),
            ("8 streams x HAProxy", ratio("stream8", name, "gbit_s", HAPROXY), ">=", 1.05),
            # issue 8: single stream at <= 0.20 CPU-s/GB (the splice-floor table shows what the kernel
            # alone costs here: docs/single-stream.md)
            ("CPU-s/GB (1 stream)", median("stream1", name, "cpu_s_per_gb"), "<=", 0.20),
            ("CPU-s/GB (8 streams)", median("stream8", name, "cpu_s_per_gb"), "<=", 0.30),
            ("req/s x HAProxy", ratio("rr", name, "rps", HAPROXY), ">=", 1.0),
            ("p99 x HAProxy", ratio("rr", name, "p99_us", HAPROXY), "<=", 1.0),
            ("conn/s x HAProxy", ratio("connrate", name, "conn_s", HAPROXY), ">=", 1.0),
            ("CPU-us/conn x HAProxy", ratio("connrate", name, "cpu_us_per_conn", HAPROXY), "<=", 1.0),
            ("busiest worker (connrate)", median("connrate", name, "worker_share_max"), "<=", 0.7),
            ("UDP 64 B dgram/s x nginx", ratio("udp64", name, "dgram_s", NGINX), ">=", 1.5),
            ("UDP 1200 B dgram/s x nginx", ratio("udp1200", name, "dgram_s", NGINX), ">=", 1.5),
            ("UDP CPU/dgram x nginx", ratio("udp64", name, "cpu_s_per_mdgram", NGINX), "<=", 0.5),
            ("idle: thread growth", idle_row.get("thread_growth"), "<=", 0),
            ("idle: pipes held", idle_row.get("pipes_held"), "<=", 0),
            ("idle: RSS B/conn", idle_row.get("rss_per_conn"), "<=", 4096),
        ]
        for goal, value, op, limit in goals:
            ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
            checks.append({"contender": name, "goal": goal, "value": value, "op": op, "limit": limit, "ok": ok})
    return checks
