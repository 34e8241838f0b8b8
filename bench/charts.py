"""PNG bar charts of a batch (matplotlib): per metric, each contender's ratio to the references.

One chart per metric: for every contender a group of bars, its per-round-median ratio of the
metric's headline value (Gbit/s, req/s, conn/s, dgram/s, p50) to `direct` and to HAProxy (to
nginx stream for the UDP metrics), with a line at 1.0. Written next to the markdown tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.summary import METRIC_TITLES, VALUES, ratio_columns


def available() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "not installed: matplotlib (pip install '.[bench]')"
    return None


def series(summary: dict[str, Any], metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """Contenders with a value for the metric, and per reference their ratios (NaN when missing)."""
    key = VALUES[metric][0][0]
    refs = [r for r in ratio_columns(metric)[:2] if r in summary.get(metric, {})]  # direct, HAProxy/nginx
    names = [n for n, e in summary.get(metric, {}).items() if e[key]["median"] is not None]
    bars: dict[str, list[float]] = {}
    for ref in refs:
        values = [summary[metric][n][key]["ratio"][ref]["median"] for n in names]
        bars[ref] = [float("nan") if v is None else float(v) for v in values]
    return names, bars


def draw(summary: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """Write <stem>-<metric>.png for every metric with results; returns metric -> file name."""
    if available():
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    for metric, values in VALUES.items():
        names, bars = series(summary, metric)
        if not names or not bars:
            continue
        unit = values[0][1]
        better = "higher" if values[0][2] else "lower"
        fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 3.8), dpi=100)
        width = 0.8 / len(bars)
        for i, (ref, ratios) in enumerate(bars.items()):
            xs = [x + (i - (len(bars) - 1) / 2) * width for x in range(len(names))]
            label = "HAProxy" if ref == "haproxy" else ref
            ax.bar(xs, ratios, width, label=f"x {label}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{unit}, ratio ({better} is better)")
        ax.set_title(METRIC_TITLES[metric], fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{stem}-{metric}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        written[metric] = name
    return written
