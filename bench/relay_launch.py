"""Fallback launcher for a relay engine when `python -m relay run` is not usable: one worker,
in this process, through relay.serve.server.Server. Prints 'READY <port>' once listening.

Run: python -m bench.relay_launch --engine uring --listen 127.0.0.1:0 --backend 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import signal
import time

from bench.competitors.cli import hostport
from bench.procs import raise_nofile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--listen", type=hostport, default=("127.0.0.1", 0))
    parser.add_argument("--backend", type=hostport, required=True)
    parser.add_argument("--maxconn", type=int, default=20000)
    args = parser.parse_args()
    raise_nofile()
    from relay import config
    from relay.serve.server import Server

    cfg = config.from_dict({
        "relay": {"engine": args.engine, "workers": 1, "maxconn": args.maxconn, "flow_log": False,
                  "log_level": "warning"},
        "listener": [{"name": "main", "bind": f"{args.listen[0]}:{args.listen[1]}", "mode": "backend",
                      "backend": f"{args.backend[0]}:{args.backend[1]}"}],
    })
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # the server thread inherits the mask
    server = Server(cfg, engine=args.engine)
    server.start_thread()
    try:
        deadline = time.monotonic() + 10
        while not server.bound_addresses().get("main") and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"READY {server.bound_addresses()['main'][1]}", flush=True)
        signal.sigwait(stop_signals)
    finally:
        server.stop(drain_timeout=0)


if __name__ == "__main__":
    main()
