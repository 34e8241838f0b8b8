"""A second `relay run` on an address already served is refused (EADDRINUSE, one line), like
nginx does, unless every listener on it says `reuseport = true`."""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import echo as echo_handler
from helpers import echo_roundtrip

from relay.lab.process import NotReady, relay_config


@pytest.mark.timeout(60)
def test_second_relay_on_a_served_address_is_refused(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    first = relays(lambda adm: relay_config(origin.port, admin_socket=adm))
    host, port = first.wait_ready()["main"]
    second = relays(lambda adm: relay_config(origin.port, bind=f"{host}:{port}"))
    started = time.monotonic()
    with pytest.raises(NotReady):
        second.wait_ready(timeout=20)
    assert second.wait_exit() == 1
    assert time.monotonic() - started < 10, "the refusal must come at once, not after a boot"
    errors = [line for line in second.err if "address already in use" in line]
    assert len(errors) == 1, second.output()
    assert f"listener {host}:{port}: address already in use" in errors[0]
    assert "reuseport = true" in errors[0]
    assert "Traceback" not in second.stderr()
    # the first relay never noticed
    assert echo_roundtrip((host, port), b"still mine" * 1000)
    assert [w["state"] for w in first.workers(None)] == ["serving"]


@pytest.mark.timeout(60)
def test_reuseport_shares_an_address_on_purpose(origins: Any, relays: Any) -> None:
    origin = origins(echo_handler)
    first = relays(lambda adm: relay_config(origin.port, extra="reuseport = true\n"))
    host, port = first.wait_ready()["main"]
    second = relays(lambda adm: relay_config(origin.port, bind=f"{host}:{port}",
                                             extra="reuseport = true\n"))
    assert second.wait_ready()["main"] == (host, port)
    for _ in range(8):
        assert echo_roundtrip((host, port), b"shared" * 1000)
