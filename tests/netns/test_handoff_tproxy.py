"""Reload handoff of TPROXY + soft-unicast flows in network namespaces: adopted flows keep
their connection (the origin sees the same egress address and port, because it is the same
TCP connection); a reload whose policy now denies a destination resets exactly those flows."""

from __future__ import annotations

import signal
import time

import pytest
from helpers import require_engine, require_netns, wait_for

from relay.lab.netlab import lab_config, open_flow, relay_nft, running_lab
from relay.lab.origins import split_hostport

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

SLICE = (40000, 40007)
ALLOW_BOTH = ("198.51.100.0/24:80,443",)
ALLOW_80 = ("198.51.100.0/24:80",)


@pytest.mark.parametrize("engine", ["uring", "epoll"])
def test_reload_denying_a_destination_resets_exactly_its_flows(
    engine: str, engine_availability: dict[str, str | None], tmp_path: object,
) -> None:
    require_netns()
    require_engine(engine, engine_availability)
    lab_cfg = lab_config(engine, SLICE, allow=ALLOW_BOTH)
    with running_lab(str(tmp_path), lab_cfg, [("198.51.100.10", 80),
                                              ("198.51.100.11", 443)]) as env:
        kept = [open_flow(env.topo, env.lab.client, ("198.51.100.10", 80)) for _ in range(3)]
        cut = [open_flow(env.topo, env.lab.client, ("198.51.100.11", 443)) for _ in range(2)]
        for f in kept + cut:
            assert f.seen.peer[0] == env.lab.egress4 and SLICE[0] <= f.seen.peer[1] <= SLICE[1]
        cut_ports = {f.sock.getsockname()[1] for f in cut}
        env.relay.config_path.write_text(lab_config(engine, SLICE, allow=ALLOW_80))
        env.relay.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done: generation 2 serving" in env.relay.stderr(), 20,
                 "generation 2 serving")
        wait_for(lambda: "handoff done" in env.relay.stderr(), 5, "the handoff")
        time.sleep(0.3)
        for f in kept:                               # same connection, same egress port
            assert f.finish(b"y" * 5000) == 5000
        for f in cut:
            with pytest.raises(OSError):
                f.finish(b"y" * 5000)
        refused = env.relay.flows_where(
            lambda r: r["reason"] == "handoff_refused_destination_denied")
        ports = {split_hostport(str(r["client"]))[1] for r in refused}
        assert ports == cut_ports
        def finished() -> list[dict]:
            return [r for r in env.relay.flows()
                    if r["reason"] == "eof" and str(r["dest"]).endswith(":80")]

        wait_for(lambda: len(finished()) >= 3, 5, "the flow lines")
        done = finished()
        assert len(done) == 3, done                  # one line per connection
        assert {split_hostport(str(r["egress"])) for r in done} == {f.seen.peer for f in kept}


def test_reload_moving_the_egress_slice_resets_the_flows_outside_it(
    engine_availability: dict[str, str | None], tmp_path: object,
) -> None:
    require_netns()
    engine = require_engine("uring", engine_availability)
    lab_cfg = lab_config(engine, SLICE, allow=ALLOW_BOTH)
    with running_lab(str(tmp_path), lab_cfg, [("198.51.100.10", 80)]) as env:
        flows = [open_flow(env.topo, env.lab.client, ("198.51.100.10", 80)) for _ in range(3)]
        ports = {f.sock.getsockname()[1] for f in flows}
        env.relay.config_path.write_text(lab_config(engine, (40008, 40015), allow=ALLOW_BOTH))
        env.relay.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload done: generation 2 serving" in env.relay.stderr(), 20,
                 "generation 2 serving")
        wait_for(lambda: len([r for r in env.relay.flows()
                              if r["reason"] == "handoff_refused_egress_slice"]) == 3, 5,
                 "three refusals")
        refused = [r for r in env.relay.flows() if r["reason"] == "handoff_refused_egress_slice"]
        assert {split_hostport(str(r["client"]))[1] for r in refused} == ports
        for f in flows:
            with pytest.raises(OSError):
                f.finish(b"z" * 100)
        # A new connection leaves through the new slice, once the kernel's slice guard knows
        # it: a moved slice needs `relay nft --apply` again (the guard drops ports outside the
        # slice it was given).
        rules = relay_nft(env.topo, env.lab.relay, "-c", str(env.relay.config_path), "--apply",
                          "--ingress", env.lab.relay_ingress)
        assert rules.returncode == 0, rules.stderr
        fresh = open_flow(env.topo, env.lab.client, ("198.51.100.10", 80))
        assert 40008 <= fresh.seen.peer[1] <= 40015
        assert fresh.finish(b"z" * 100) == 100
