"""The reload handoff (docs/handoff.md) in /metrics and in `relay stats`.

The workers' counters (relay.serve.handoff.Handoff.stats) are summed by relay.ops.metrics like
every other: the old workers' ``handoff_handed_over`` / ``handoff_lost`` / ``handoff_kept``
survive their exit (retired counters), the new workers' ``handoff_adopted``,
``handoff_refused`` by reason and the pause histogram ``handoff_pause_seconds`` follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["handoff_metrics", "handoff_summary", "quantile"]


def quantile(hist: dict[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding quantile `q` of a cumulative histogram snapshot
    (None when empty; inf when it lies past the last finite bound)."""
    n = hist.get("count", 0)
    if not n:
        return None
    rank = q * n
    for bound, cumulative in hist.get("buckets", []):
        if cumulative >= rank:
            return float(bound)
    return float("inf")


def handoff_metrics(t: dict[str, Any]) -> Iterator[Any]:
    """Metric families from the summed worker stats `t`."""
    yield CounterMetricFamily("relay_handoff_handed_over",
                              "Flows an old worker handed to a new one at reload (acked)",
                              value=t.get("handoff_handed_over", 0))
    yield CounterMetricFamily("relay_handoff_adopted",
                              "Flows a new worker adopted from an old one at reload",
                              value=t.get("handoff_adopted", 0))
    refused = CounterMetricFamily("relay_handoff_refused",
                                  "Flows a new worker refused at reload (reset), by reason",
                                  labels=["reason"])
    for reason, n in sorted(t.get("handoff_refused", {}).items()):
        refused.add_metric([reason], n)
    yield refused
    yield CounterMetricFamily("relay_handoff_lost",
                              "Flows sent to a new worker that died before adopting them",
                              value=t.get("handoff_lost", 0))
    yield CounterMetricFamily("relay_handoff_kept",
                              "Flows that could not be sent and drained in the old worker",
                              value=t.get("handoff_kept", 0))
    yield CounterMetricFamily("relay_handoff_pending_bytes",
                              "Bytes held in pipes and copy buffers when their flow moved",
                              value=t.get("handoff_pending_bytes", 0))
    hist = t.get("handoff_pause_seconds")
    if hist and hist.get("buckets"):
        h = HistogramMetricFamily(
            "relay_handoff_pause_seconds",
            "Per flow: from its export by the old worker to its import by the new one")
        h.add_metric([], [(str(b), c) for b, c in hist["buckets"]], hist.get("sum", 0.0))
        yield h
    yield GaugeMetricFamily("relay_handoff_pause_max_seconds",
                            "Longest handoff pause of one flow so far",
                            value=t.get("handoff_pause_max_seconds", 0.0))


def handoff_summary(t: dict[str, Any]) -> list[str]:
    """The `relay stats` lines (none before the first handoff)."""
    refused = {k: v for k, v in t.get("handoff_refused", {}).items() if v}
    moved = t.get("handoff_handed_over", 0) + t.get("handoff_adopted", 0)
    if not (moved or refused or t.get("handoff_lost", 0) or t.get("handoff_kept", 0)):
        return []
    line = (f"handoff: handed over {t.get('handoff_handed_over', 0)}, "
            f"adopted {t.get('handoff_adopted', 0)}, lost {t.get('handoff_lost', 0)}, "
            f"kept (drained) {t.get('handoff_kept', 0)}")
    if refused:
        line += ", refused " + ", ".join(f"{k}={v}" for k, v in sorted(refused.items()))
    lines = [line]
    hist = t.get("handoff_pause_seconds") or {}
    if hist.get("count"):
        def ms(q: float) -> str:
            v = quantile(hist, q)
            return "-" if v is None else (f"<= {v * 1000:g} ms" if v != float("inf") else "> 5 s")

        lines.append(f"handoff pause: p50 {ms(0.5)}, p99 {ms(0.99)}, "
                     f"max {t.get('handoff_pause_max_seconds', 0.0) * 1000:.2f} ms, "
                     f"mean {hist['sum'] / hist['count'] * 1000:.2f} ms "
                     f"over {hist['count']} flows")
    return lines
