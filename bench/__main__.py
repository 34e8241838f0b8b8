"""python -m bench [--quick] [--only NAMES] [--rounds N] [--duration S] [--out DIR] [--micro]

Runs the relay engines and the competitors side by side in one interleaved batch and writes
bench/results/<date>-<host>.json, .md and LATEST.md. --micro runs the pytest-benchmark
micro-benchmarks of the core instead.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.runner import METRICS, Batch, Options, log

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 rounds of 1 s runs, 2,000 idle connections")
    p.add_argument("--only", help="comma-separated contenders (uring,epoll,asyncio,relay-uring-nolog,"
                                  "relay-uring-w2,relay-udp,haproxy,nginx-stream,socat,uvloop-protocol,"
                                  "asyncio-protocol,asyncio-streams,embedded,direct)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 4, quick 2)")
    p.add_argument("--duration", type=float, help="seconds per run (default 3, quick 1)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--idle-conns", type=int, help="idle connections (default 10000, quick 2000; 0 = skip)")
    p.add_argument("--rr-conns", type=int, default=16, help="request/response connections (default 16)")
    p.add_argument("--udp-rate", type=float, default=0.0,
                   help="offered datagrams/s of udp64/udp1200 (default 0: as fast as the blaster goes)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run wait up to S seconds for other processes' load to drop "
                        "below 0.3 CPU (default 0: don't wait)")
    p.add_argument("--seed", type=int, help="shuffle seed (default random, recorded)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--micro", action="store_true", help="run the core micro-benchmarks (pytest-benchmark)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> Options:
    opts = Options(
        rounds=args.rounds or (2 if args.quick else 4),
        duration=args.duration or (1.0 if args.quick else 3.0),
        rr_conns=args.rr_conns,
        udp_rate=args.udp_rate,
        quiet_wait=args.quiet_wait,
        idle_conns=args.idle_conns if args.idle_conns is not None else (2000 if args.quick else 10_000),
        only=[n.strip() for n in args.only.split(",") if n.strip()] if args.only else None,
    )
    if args.metrics:
        opts.metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        unknown = set(opts.metrics) - set(METRICS)
        if unknown:
            raise SystemExit(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}")
    opts.idle = opts.idle_conns > 0
    if args.seed is not None:
        opts.seed = args.seed
    return opts


def micro(out_dir: Path) -> int:
    """Run bench/micro with pytest-benchmark; its JSON goes to <out>/<date>-<host>-micro.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y-%m-%dT%H%M", time.gmtime()) + "-" + socket.gethostname()
    json_path = out_dir / (stem + "-micro.json")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "micro"),
            "--benchmark-columns=min,median,mean,ops,rounds", "--benchmark-sort=name",
            f"--benchmark-json={json_path}"]
    rc = subprocess.run(argv, cwd=HERE.parent, timeout=600).returncode
    if json_path.exists():
        drop_raw_timings(json_path)
    return rc


def drop_raw_timings(path: Path) -> None:
    """Keep pytest-benchmark's summary statistics, not every timing (tens of MB of numbers)."""
    doc = json.loads(path.read_text())
    for bench in doc.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.micro:
        return micro(args.out)
    opts = options(args)
    log(f"batch: {opts.rounds} rounds x {','.join(opts.metrics)}, {opts.duration:g} s runs, "
        f"idle {opts.idle_conns}, seed {opts.seed}")
    doc = report.build(Batch(opts).run())
    json_path, md_path = report.write(doc, args.out)
    print(report.markdown(doc))
    log(f"wrote {json_path}, {md_path} and {args.out / 'LATEST.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
