"""python -m bench.scale: cost as the work grows (issue 8, item 5).

wrk (keep-alive, one thread) with N = 1, 10, 100, 1,000 ... concurrent connections through each
proxy to an nginx origin that answers every request with a 64 KiB body, so every connection is
active all the time and each level moves bulk bytes. Per level and contender: requests/s, p99,
the proxy's CPU per GB delivered, CPU-µs per request and CPU-µs per connection-second (the
proxy's CPU divided by N x run time: what holding one busy connection costs), and the proxy's
RSS. Rounds interleave the contenders (shuffled) at each level.

The top level is capped by the hard RLIMIT_NOFILE (20,000 on the machine this was written on,
which root cannot raise): a proxy holds 2 fds per connection plus its pipes and listeners, so
``bench.procs.max_proxied_conns()`` (9,700 here) is the most a proxy can carry; 10,000 is
lowered to that and the report says so.

Run: python -m bench.scale [--only relay-uring,haproxy] [--levels 1,10,100,1000,10000]
     [--rounds 2] [--duration 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench import contenders, procs
from bench.competitors import nginx
from bench.drivers import procstat
from bench.drivers.foreign import ForeignLoad
from bench.drivers.wrk import parse as parse_wrk

BODY = 64 * 1024
LEVELS = (1, 10, 100, 1000, 10_000)

ORIGIN_HTTP = """\
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    sendfile on;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {tmp}/www;
        location / {{ default_type application/octet-stream; }}
    }}
}}
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_origin(tmp: Path) -> procs.Service:
    # nginx's worker runs as nobody: the body and every directory above it must be readable.
    tmp.chmod(0o755)
    (tmp / "www").mkdir(mode=0o755, exist_ok=True)
    (tmp / "www" / "64k").write_bytes(random.Random(1).randbytes(BODY))
    (tmp / "www" / "64k").chmod(0o644)
    nofile = min(procs.nofile_hard(), procs.NOFILE)

    def make(port: int) -> procs.Service:
        conf = tmp / f"nginx-scale-{port}.conf"
        conf.write_text(nginx._main(tmp, port, nofile, stream=False)
                        + ORIGIN_HTTP.format(tmp=tmp, port=port))
        return procs.Service("nginx-origin", nginx.argv(conf))

    return procs.start_retrying(make)


def plan_levels(wanted: list[int], cap: int, nofile_hard: int) -> tuple[list[int], list[str]]:
    """The levels to run (each at most `cap`, no repeats, in order) and a note per lowered one."""
    levels: list[int] = []
    capped: list[str] = []
    for level in wanted:
        if level > cap:
            capped.append(f"{level:,} lowered to {cap:,}: a proxy holds 2 fds per connection "
                          f"plus pipes and listeners under the hard RLIMIT_NOFILE of "
                          f"{nofile_hard:,}")
            level = cap
        if level not in levels:
            levels.append(level)
    return levels, capped


def run_wrk(port: int, conns: int, duration: float, pids: list[int]) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "10s", f"http://127.0.0.1:{port}/64k"]
    cpu0 = procstat.tree_cpu_seconds(pids)
    t0 = time.monotonic()
    with ForeignLoad() as foreign:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    elapsed = time.monotonic() - t0
    cpu = max(0.0, procstat.tree_cpu_seconds(pids) - cpu0)
    out = parse_wrk(done.stdout + done.stderr)
    requests = out.get("requests", 0.0)
    if not requests or out["errors_http"] >= requests:
        raise RuntimeError(f"wrk completed no request: {done.stdout.strip()[-300:]}")
    seconds = out.get("seconds", elapsed)
    gb = requests * BODY / 1e9
    out.update({
        "cpu_s": cpu,
        "cpu_s_per_gb": cpu / gb,
        "cpu_us_per_req": cpu / requests * 1e6,
        "cpu_us_per_conn_s": cpu / (conns * seconds) * 1e6,
        "gbit_s": gb * 8 / seconds,
        "rss_mb": sum(procstat.rss_bytes(p) for p in pids) / 1e6,
        "foreign_cpus": foreign.cpus,
    })
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="relay-uring,haproxy")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    procs.raise_nofile()
    levels, capped = plan_levels([int(x) for x in args.levels.split(",")],
                                 procs.max_proxied_conns(), procs.nofile_hard())
    chosen = contenders.select(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="relay-scale-"))
    rng = random.Random()
    results: dict[str, dict[int, list[dict[str, float]]]] = {c.name: {} for c in chosen}
    failures: dict[str, str] = {}
    origin = start_origin(tmp)
    services: dict[str, procs.Service] = {}
    try:
        for c in chosen:
            if c.start is None or c.available() is not None:
                failures[c.name] = c.available() or "not a TCP contender"
                continue
            svc = c.start(origin.port, tmp)
            assert svc is not None
            services[c.name] = svc
        for level in levels:
            for rnd in range(args.rounds):
                order = list(services)
                rng.shuffle(order)
                for name in order:
                    svc = services[name]
                    try:
                        r = run_wrk(svc.port, level, args.duration, svc.pids())
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        log(f"N={level} round {rnd} {name}: failed: {exc}")
                        continue
                    results[name].setdefault(level, []).append(r)
                    log(f"N={level:>5} round {rnd} {name:<12} req/s={r['rps']:,.0f} "
                        f"p99={r.get('p99_us', float('nan')):,.0f}us "
                        f"CPU-s/GB={r['cpu_s_per_gb']:.3f} CPU-us/req={r['cpu_us_per_req']:.1f} "
                        f"CPU-us/conn-s={r['cpu_us_per_conn_s']:,.1f} rss={r['rss_mb']:.0f}MB "
                        f"errors={r['errors']:.0f} other-load={r['foreign_cpus']:.2f}")
    finally:
        for svc in services.values():
            svc.stop()
        origin.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    write(results, levels, capped, failures, args, Path(args.out))


def _med(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return median(values) if values else float("nan")


def write(results: dict[str, dict[int, list[dict[str, float]]]], levels: list[int],
          capped: list[str], failures: dict[str, str], args: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M", time.gmtime())
    cols = [("rps", "req/s", "{:,.0f}"), ("gbit_s", "Gbit/s", "{:.2f}"),
            ("p99_us", "p99 us", "{:,.0f}"), ("cpu_s_per_gb", "CPU-s/GB", "{:.3f}"),
            ("cpu_us_per_req", "CPU-us/req", "{:.1f}"),
            ("cpu_us_per_conn_s", "CPU-us/conn-s", "{:,.1f}"), ("rss_mb", "RSS MB", "{:.0f}"),
            ("errors", "errors", "{:.0f}"), ("foreign_cpus", "other load, CPUs", "{:.2f}")]
    lines = [f"# cost as the work grows ({stamp} UTC)", "",
             f"wrk -t1 keep-alive, 64 KiB responses from an nginx origin, {args.rounds} "
             f"interleaved rounds of {args.duration:g} s per level; medians over rounds. CPU = "
             "the proxy's process tree; CPU-us/conn-s = CPU / (N x seconds).", ""]
    lines += [f"- {c}" for c in capped]
    lines += [f"- {name}: skipped: {why}" for name, why in failures.items()]
    lines += ["", "| N | contender | " + " | ".join(label for _, label, _ in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for level in levels:
        for name, by_level in results.items():
            rows = by_level.get(level, [])
            if not rows:
                continue
            cells = [fmt.format(_med(rows, key)) for key, _, fmt in cols]
            lines.append(f"| {level:,} | {name} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (out / f"{stamp}-scale.md").write_text(md)
    raw: dict[str, Any] = {"levels": levels, "capped": capped, "failures": failures,
                           "results": {n: {str(k): v for k, v in r.items()}
                                       for n, r in results.items()}}
    (out / f"{stamp}-scale.json").write_text(json.dumps(raw, indent=1))
    print(md)


if __name__ == "__main__":
    main()
