"""One interleaved batch: every round runs every contender once per metric, in shuffled order."""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import contenders, procs
from bench.competitors import nginx
from bench.contenders import Contender
from bench.drivers import echo_origin, idle, iperf, procstat, relay_stats, rr, sockperf, udp, wrk
from bench.drivers.foreign import ForeignLoad, wait_quiet

METRICS = ("stream1", "stream8", "rr", "connrate", "latency", "udp64", "udp1200", "udpflows")
# The origin each metric's traffic ends at; "udp" origins make it a UDP metric.
ORIGIN = {"stream1": "iperf", "stream8": "iperf", "rr": "echo", "connrate": "http", "latency": "sockperf",
          "udp64": "udp", "udp1200": "udp", "udpflows": "udp"}
UDP_SIZE = {"udp64": 64, "udp1200": 1200, "udpflows": 64}


def protocol(metric: str) -> str:
    return "udp" if ORIGIN[metric] == "udp" else "tcp"


@dataclass
class Options:
    rounds: int = 4
    duration: float = 3.0  # seconds per iperf3 run and per request/response run
    rr_conns: int = 16
    rr_size: int = 64
    conn_conns: int = 32  # wrk connections of the connection-rate metric
    udp_rate: float = 0.0  # offered datagrams/s of the udp64/udp1200 runs (0: as fast as the blaster goes)
    idle_conns: int = 10_000
    only: list[str] | None = None
    metrics: tuple[str, ...] = METRICS
    idle: bool = True
    quiet_wait: float = 0.0  # before each run, wait up to this long for other load to calm down
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Batch:
    """Origins, proxy instances (one per contender and origin) and the results of one batch."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.rng = random.Random(opts.seed)
        self.contenders = contenders.select(opts.only)
        self.status: dict[str, dict[str, Any]] = {}
        self.instances: dict[tuple[str, str], procs.Service | None] = {}
        self.origins: dict[str, procs.Service] = {}
        self.rounds: list[dict[str, Any]] = []
        self.idle: dict[str, dict[str, Any]] = {}
        self.idle_count = 0
        self.skipped_metrics: dict[str, str] = {}
        reason = iperf.available()
        if reason:
            self.skipped_metrics.update(stream1=reason, stream8=reason)
        reason = wrk.available() or nginx.available()
        if reason:
            self.skipped_metrics["connrate"] = reason
        reason = sockperf.available()
        if reason:
            self.skipped_metrics["latency"] = reason
        for c in self.contenders:
            reason = c.available()
            self.status[c.name] = {"kind": c.kind, "status": "skipped" if reason else "ok", "reason": reason,
                                   "variant": c.variant}

    # -- origins -------------------------------------------------------------------------------

    def _start_origin(self, kind: str) -> procs.Service:
        if kind == "iperf":
            reason = iperf.available()
            if reason:
                raise procs.StartError(reason)
            return iperf.start_server()
        if kind == "udp":
            return udp.start_sink(contenders.ROOT)
        if kind == "sockperf":
            return sockperf.start_server()
        if kind == "http":
            nofile = min(procs.nofile_hard(), procs.NOFILE)
            return procs.start_retrying(
                lambda port: procs.Service("nginx-origin", nginx.argv(nginx.origin_config(self.tmp, port, nofile))))
        argv = [sys.executable, "-m", echo_origin.__name__, "--listen", "127.0.0.1:0"]
        return procs.start_reporting_port("echo-origin", argv, cwd=contenders.ROOT)

    def origin(self, kind: str) -> procs.Service:
        svc = self.origins.get(kind)
        if svc is None or not svc.alive():
            port = svc.port if svc is not None else 0
            if svc is not None:
                svc.stop()
            if kind == "iperf" and port:
                svc = procs.Service("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)])
                svc.wait_listening(port, 20.0)
                svc.port = port
            else:
                svc = self._start_origin(kind)
            self.origins[kind] = svc
        return svc

    def restart_origin(self, kind: str) -> None:
        svc = self.origins.get(kind)
        if svc is not None:
            svc.stop()
            time.sleep(0.2)
        self.origin(kind)

    # -- proxies -------------------------------------------------------------------------------

    def instance(self, c: Contender, kind: str, flows: bool = False) -> procs.Service | None:
        """The running proxy of contender `c` in front of origin `kind` (started on first use);
        flows: the one set up for the udpflows metric, when `c` has one."""
        flows = flows and c.start_udp_flows is not None
        key = (c.name, "udpflows" if flows else kind)
        svc = self.instances.get(key)
        if svc is not None and not svc.alive():
            log(f"{c.name} ({kind}) died: {svc.failure_reason()}; restarting")
            svc.stop()
            svc = None
            self.instances.pop(key, None)
        if key not in self.instances:
            origin = self.origin(kind)
            start = c.start_udp_flows if flows else c.start_udp if kind == "udp" else c.start
            assert start is not None, f"{c.name} does not serve {kind}"
            svc = start(origin.port, self.tmp)
            self.instances[key] = svc
        return self.instances[key]

    def stop_instances(self) -> None:
        for svc in self.instances.values():
            if svc is not None:
                svc.stop()
        self.instances.clear()

    # -- measurements --------------------------------------------------------------------------

    def measure(self, c: Contender, metric: str) -> dict[str, Any]:
        kind = ORIGIN[metric]
        svc = self.instance(c, kind, flows=metric == "udpflows")
        target = svc.port if svc is not None else self.origin(kind).port
        pids = svc.pids if svc is not None else list
        if metric == "connrate":
            def run() -> dict[str, Any]:
                return dict(wrk.run(target, self.opts.conn_conns, self.opts.duration, pids))

            if svc is None or c.workers < 2 or not svc.admin_socket:
                return run()
            # Each worker's share of the accepted connections (relay stats json, admin socket).
            result, shares, why = relay_stats.shares_around(svc.admin_socket, run)
            result["worker_shares"] = shares
            if why:
                result["worker_shares_missing"] = why
            result["worker_share_max"] = shares[0] if shares else float("nan")
            return result
        if metric in UDP_SIZE:
            return dict(udp.run(target, self.origin("udp").control_port, UDP_SIZE[metric], self.opts.duration,
                                0.0 if metric == "udpflows" else self.opts.udp_rate, metric == "udpflows",
                                pids, contenders.ROOT))
        if metric == "latency":
            return dict(sockperf.run(target, self.opts.duration))
        if metric == "rr":
            return rr.run(target, self.opts.rr_conns, self.opts.rr_size, self.opts.duration, pids,
                          contenders.ROOT)
        self.origin("iperf")
        streams = 1 if metric == "stream1" else 8
        try:
            return iperf.run_client(target, streams, self.opts.duration, pids)
        except RuntimeError:
            # A failed test can leave the single-test iperf3 server busy for minutes.
            self.restart_origin("iperf")
            raise

    def run_round(self, index: int) -> None:
        record: dict[str, Any] = {"round": index, "order": {}, "results": {}}
        for metric in self.opts.metrics:
            if metric in self.skipped_metrics:
                continue
            try:
                self.origin(ORIGIN[metric])  # an origin failure is no proxy's fault
            except procs.StartError as exc:
                self.skipped_metrics[metric] = f"origin failed to start: {exc}"
                log(f"{metric}: skipped: {exc}")
                continue
            names = [c for c in self.contenders
                     if self.status[c.name]["status"] == "ok" and c.measures(metric, protocol(metric))]
            self.rng.shuffle(names)
            record["order"][metric] = [c.name for c in names]
            results: dict[str, dict[str, Any]] = {}
            for c in names:
                if self.status[c.name]["status"] != "ok":
                    continue
                try:
                    flows = metric == "udpflows"
                    svc = self.instance(c, ORIGIN[metric], flows)  # start outside the probe
                    waited = wait_quiet(self.opts.quiet_wait) if self.opts.quiet_wait else 0.0
                    with ForeignLoad() as load:
                        results[c.name] = self.measure(c, metric)
                    results[c.name]["foreign_cpus"] = load.cpus
                    results[c.name]["quiet_wait_s"] = waited
                    if svc is not None and not svc.alive():
                        # A proxy that crashed under the load makes every ratio against it void.
                        results[c.name] = {"error": f"died during the run: {svc.failure_reason()}"}
                except procs.StartError as exc:
                    self.status[c.name].update(status="failed", reason=str(exc))
                    log(f"{c.name}: failed to start: {exc}")
                    continue
                except (RuntimeError, OSError) as exc:
                    results[c.name] = {"error": str(exc)[:300]}
                log(f"round {index} {metric:7s} {c.name:17s} {_short(results[c.name])}")
            record["results"][metric] = results
        self.rounds.append(record)

    def run_idle(self) -> None:
        count = min(self.opts.idle_conns, procs.max_proxied_conns())
        if count < self.opts.idle_conns:
            log(f"idle: {count} connections, not {self.opts.idle_conns}: the hard RLIMIT_NOFILE is "
                f"{procs.nofile_hard()} and cannot be raised here")
        self.idle_count = count
        for c in self.contenders:
            if not c.idle or self.status[c.name]["status"] != "ok":
                continue
            svc: procs.Service | None = None
            try:
                origin = self.origin("echo")
                assert c.start is not None
                svc = c.start(origin.port, self.tmp)
                assert svc is not None
                self.idle[c.name] = idle.run(svc.port, count, svc.pids)
            except procs.StartError as exc:
                self.idle[c.name] = {"error": f"failed to start: {exc}"}
            except (RuntimeError, OSError) as exc:
                self.idle[c.name] = {"error": str(exc)[:300]}
            finally:
                if svc is not None:
                    svc.stop()
            log(f"idle {c.name:17s} {_short(self.idle[c.name])}")

    def run(self) -> dict[str, Any]:
        started = time.time()
        cpu_start = procstat.system_cpu_ticks()
        try:
            for index in range(self.opts.rounds):
                self.run_round(index)
            self.stop_instances()
            if self.opts.idle:
                self.run_idle()
        finally:
            self.stop_instances()
            for svc in self.origins.values():
                svc.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)
        cpu_end = procstat.system_cpu_ticks()
        total = cpu_end["total"] - cpu_start["total"]
        return {
            "steal_pct": 100.0 * (cpu_end["steal"] - cpu_start["steal"]) / total if total else 0.0,
            "options": asdict(self.opts),
            "started": started,
            "seconds": time.time() - started,
            "relay_mode": dict(contenders.RELAY_MODE),
            "contenders": self.status,
            "rounds": self.rounds,
            "idle": self.idle,
            "idle_connections": self.idle_count,
            "skipped_metrics": self.skipped_metrics,
            "nofile_hard": procs.nofile_hard(),
        }


def _short(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error'][:120]}"
    keys = ("gbit_s", "cpu_s_per_gb", "rps", "dgram_s", "loss_pct", "cpu_s_per_mdgram", "p50_us", "p99_us", "cpu_us_per_conn", "errors", "worker_share_max",
            "rss_per_conn", "thread_growth", "pipes_held", "foreign_cpus")
    return " ".join(f"{k}={result[k]:.3g}" for k in keys if isinstance(result.get(k), int | float))
