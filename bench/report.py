"""Write a batch as JSON, a markdown table and LATEST.md (the table for the README)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import charts
from bench.contenders import HAPROXY, SCALING, SPLICE_FLOOR
from bench.machine import machine
from bench.summary import (
    METRIC_TITLES,
    VALUES,
    finite,
    floor_rows,
    ratio_columns,
    scaling,
    summarize,
    targets,
)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ratio_range(ratio: dict[str, Any]) -> str:
    """Median of the per-round ratios, with their range when there are several rounds."""
    text = _ratio(ratio["median"])
    rounds = finite(ratio["rounds"])
    if len(rounds) > 1 and ratio["median"] is not None and max(rounds) - min(rounds) >= 0.005:
        text += f" ({min(rounds):.2f}-{max(rounds):.2f})"
    return text


def _foreign(batch: dict[str, Any]) -> str:
    """Other processes' CPU during the runs (other people's tests share this VM)."""
    loads = [row["foreign_cpus"] for r in batch["rounds"] for res in r["results"].values()
             for row in res.values() if "foreign_cpus" in row]
    if not loads:
        return "foreign load not measured"
    return (f"foreign load during runs (CPUs busy outside this harness, kernel threads included) "
            f"median {statistics.median(loads):.2f}, max {max(loads):.2f}")


def _client_cpu(batch: dict[str, Any]) -> str:
    loads = [row["client_cpu"] for r in batch["rounds"] for row in r["results"].get("rr", {}).values()
             if "client_cpu" in row]
    if not loads:
        return ""
    return (f"The request/response generator (one process) used median {statistics.median(loads):.2f}, "
            f"max {max(loads):.2f} of one CPU.")


def _modes(modes: dict[str, str]) -> str:
    if not modes:
        return "not started"
    names = {"cli": "relay run", "server": "relay.serve.server.Server fallback"}
    return ", ".join(f"{engine}: {names.get(mode, mode)}" for engine, mode in sorted(modes.items()))


def markdown(doc: dict[str, Any], charts: dict[str, str] | None = None) -> str:
    """The batch as markdown; `charts` (metric -> PNG file name, same directory) adds the charts."""
    m, batch, summary = doc["machine"], doc["batch"], doc["summary"]
    opts = batch["options"]
    out = [
        f"# relay benchmark {doc['date']}",
        "",
        f"Machine: `{m['host']}`, Linux {m['kernel']}, {m['cpu']}, nproc {m['nproc']}; "
        f"Python {m['python']}; {m['haproxy']}; {m['iperf3']}; {m.get('nginx', '-')}; {m.get('wrk', '-')}; "
        f"{m.get('sockperf', '-')}.",
        f"Batch: {opts['rounds']} interleaved rounds (contenders shuffled per metric and round, "
        f"seed {opts['seed']}), {opts['duration']:g} s per run, request/response {opts['rr_conns']} "
        f"connections x {opts['rr_size']} B, {batch['seconds']:.0f} s in all, CPU steal "
        f"{batch.get('steal_pct', 0):.1f} %, {_foreign(batch)}. Values are medians over "
        "rounds; ratios are medians of per-round ratios (range in parentheses; only ratios within one batch mean anything "
        "on a shared VM). CPU = proxy process tree (all threads, children), GB = 1e9 bytes. "
        f"Relay: `relay run --workers 1` with its defaults (flow log on, to a file) unless the row "
        f"says otherwise ({_modes(batch['relay_mode'])}); "
        "HAProxy: `nbthread 1`, `option splice-auto`; nginx stream: 1 worker. " + _client_cpu(batch),
        "",
    ]
    variants = [f"`{n}`: {i['variant']}" for n, i in batch["contenders"].items() if i.get("variant")]
    if variants:
        out += ["Variants: " + "; ".join(variants) + ".", ""]
    order = list(batch["contenders"])
    for metric, values in VALUES.items():
        if metric not in summary or not summary[metric]:
            continue
        head_key, head_unit, _ = values[0]
        refs = ratio_columns(metric)
        cols = [head_unit, *(f"x {'HAProxy' if ref == HAPROXY else ref}" for ref in refs)]
        cols += [unit for _, unit, _ in values[1:]]
        if "p99 us" in cols:
            cols.insert(cols.index("p99 us") + 1, "p99 x HAProxy")
        out += [f"## {METRIC_TITLES[metric]}", "", "| contender | " + " | ".join(cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for name in order:
            entry = summary[metric].get(name)
            if entry is None:
                continue
            head = entry[head_key]
            cells = [_fmt(head["median"])] + [_ratio_range(head["ratio"][ref]) for ref in refs]
            for key, _, _ in values[1:]:
                value = entry[key]["median"]
                if key == "foreign_cpus":
                    cells.append("-" if value is None else f"{value:.2f}")
                elif key == "worker_share_max":
                    cells.append("-" if value is None else f"{100 * value:.0f} %")
                else:
                    cells.append(_fmt(value))
                if key == "p99_us":
                    cells.append(_ratio_range(entry[key]["ratio"][HAPROXY]))
            if entry["errors"]:
                cells[-1] += f" ({len(entry['errors'])} failed runs: {entry['errors'][0][:80]})"
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
        if charts and metric in charts:
            out += [f"![{METRIC_TITLES[metric]}]({charts[metric]})", ""]
    scaled = scaling(batch)
    if scaled:
        one, two = SCALING
        out += [f"## Scaling: `{two}` (--workers 2) over `{one}` (--workers 1)", "",
                f"| metric | {one} | {two} | ratio |", "|---|---|---|---|"]
        for metric, row in scaled.items():
            unit = next(u for k, u, _ in VALUES[metric] if k == row["key"])
            out.append(f"| {METRIC_TITLES[metric]}, {unit} | {_fmt(row['one'])} | {_fmt(row['two'])} | "
                       f"{_ratio_range(row['ratio'])} |")
        out.append("")
    for metric, rows in floor_rows(summary).items():
        floor = summary[metric][SPLICE_FLOOR]["cpu_s_per_gb"]["median"]
        out += [f"## The splice floor, {METRIC_TITLES[metric]}", "",
                f"`{SPLICE_FLOOR}` ({_fmt(floor)} CPU-s/GB) does nothing but blocking splice() through "
                "1 MiB pipes: what the kernel alone charges a zero-copy relay here. Above 1.00x is "
                "what an engine adds; below, what it saves by batching.", "",
                f"| contender | CPU-s/GB | CPU-s/GB x {SPLICE_FLOOR} | Gbit/s x {SPLICE_FLOOR} |",
                "|---|---|---|---|"]
        for name, row in rows.items():
            out.append(f"| {name} | {_fmt(row['cpu_s_per_gb'])} | {_ratio_range(row['cpu'])} | "
                       f"{_ratio_range(row['gbit'])} |")
        out.append("")
    if batch["idle"]:
        capped = ""
        if batch["idle_connections"] < opts["idle_conns"]:
            capped = (f" (not {opts['idle_conns']:,}: the hard RLIMIT_NOFILE here is "
                      f"{batch['nofile_hard']} and root lacks CAP_SYS_RESOURCE to raise it)")
        out += [f"## {batch['idle_connections']:,} idle connections through one worker{capped}", "",
                "| contender | RSS B/conn | threads before -> idle | pipes before -> idle | open s |",
                "|---|---|---|---|---|"]
        for name, row in batch["idle"].items():
            if "error" in row:
                out.append(f"| {name} | {row['error'][:120]} | | | |")
                continue
            out.append(
                f"| {name} | {_fmt(row['rss_per_conn'])} | {row['threads_before']:.0f} -> "
                f"{row['threads_idle']:.0f} | {row['pipes_before']:.0f} -> {row['pipes_idle']:.0f} | "
                f"{row['open_seconds']:.1f} |"
            )
        out.append("")
    problems = [(n, i) for n, i in batch["contenders"].items() if i["status"] != "ok"]
    skipped = batch.get("skipped_metrics", {})
    if problems or skipped:
        out += ["## Not measured", ""]
        out += [f"- {n}: {i['status']}: {i['reason']}" for n, i in problems]
        out += [f"- metric {m} ({METRIC_TITLES[m]}): {reason}" for m, reason in skipped.items()]
        out.append("")
    if doc["targets"]:
        engines = list(dict.fromkeys(t["contender"] for t in doc["targets"]))
        out += ["## Goals (relay engines, this batch; **bold** = not met)", "",
                "| goal | limit | " + " | ".join(engines) + " |", "|---" * (len(engines) + 2) + "|"]
        for goal in dict.fromkeys(t["goal"] for t in doc["targets"]):
            row = {t["contender"]: t for t in doc["targets"] if t["goal"] == goal}
            first = next(iter(row.values()))
            cells = []
            for engine in engines:
                t = row.get(engine)
                if t is None or t["ok"] is None:
                    cells.append("not measured")
                else:
                    text = _ratio(t["value"]) if " x " in goal else _fmt(t["value"])
                    cells.append(text if t["ok"] else f"**{text}**")
            limit = _ratio(first["limit"]) if " x " in goal else _fmt(first["limit"])
            out.append(f"| {goal} | {first['op']} {limit} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def build(batch: dict[str, Any]) -> dict[str, Any]:
    summary = summarize(batch)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(batch["started"])),
        "machine": machine(),
        "batch": batch,
        "summary": summary,
        "targets": targets(summary, batch["idle"], batch["contenders"]),
    }


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write <date>-<host>.json and .md, and LATEST.md; returns the JSON and markdown paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y-%m-%dT%H%M", time.gmtime(doc["batch"]["started"])) + "-" + doc["machine"]["host"]
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(_clean(doc), indent=1, default=str, allow_nan=False) + "\n")
    drawn = charts.draw(doc["summary"], out_dir, stem)
    md_path.write_text(markdown(doc, drawn) + "\n")
    for old in out_dir.glob("LATEST-*.png"):
        old.unlink()
    latest = {metric: f"LATEST-{metric}.png" for metric in drawn}
    for metric, name in drawn.items():
        shutil.copyfile(out_dir / name, out_dir / latest[metric])
    text = markdown(doc, latest)
    if not drawn and charts.available():
        text += f"\nCharts: {charts.available()}.\n"
    (out_dir / "LATEST.md").write_text(text + "\n")
    return json_path, md_path
