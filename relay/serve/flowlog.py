"""One structured log record per finished connection, on the ``relay.flow`` logger.

The record's message is ``"flow"``; the fields are in ``extra`` (``relay.ops.log`` renders
them as ``key=value`` in text mode and as JSON members in json mode):

=================  ==========================================================================
``listener``       listener name
``client``         "ip:port" of the client (after a trusted PROXY header: as the proxy said)
``dest``           original destination / backend, "ip:port" or "unix:/path"
``egress``         "ip:port" the upstream socket used when an egress slice was used, else ""
``c2s_bytes``      bytes client -> origin
``s2c_bytes``      bytes origin -> client
``spliced_bytes``  bytes moved with splice(2) (zero-copy)
``copied_bytes``   bytes copied through a user-space buffer
``duration``       seconds from accept to the end, float
``reason``         how it ended: one of relay.engines.REASONS, or "denied_<why>" /
                   "rejected_<limit>" for connections refused before relaying
``errno``          errno name behind the reason ("ECONNRESET"), "" when none
``protocol``       "tcp" or "udp"
``c2s_dgrams``     UDP only: datagrams client -> origin (``s2c_dgrams``: origin -> client)
=================  ==========================================================================

UDP flows (docs/udp.md) add the reasons ``responses``, ``closed``, ``reload`` and
``slice_exhausted``; their bytes are all copied (``spliced_bytes`` 0).
"""

from __future__ import annotations

import errno as errno_mod
import logging

__all__ = ["FLOW_LOGGER", "format_addr", "log_flow"]

FLOW_LOGGER = logging.getLogger("relay.flow")


def format_addr(addr: tuple | str | None) -> str:
    """(ip, port) -> "ip:port" ("[v6]:port" for IPv6); ("unix:/p", 0) -> "unix:/p"; None -> ""."""
    if addr is None:
        return ""
    if isinstance(addr, str):
        return addr
    host = str(addr[0])
    if len(addr) < 2 or host.startswith("unix:"):
        return host
    if not host:  # unix-socket peer: getpeername() is ""
        return "unix"
    if ":" in host:
        return f"[{host}]:{addr[1]}"
    return f"{host}:{addr[1]}"


def log_flow(
    *,
    listener: str,
    client: tuple | str | None,
    dest: tuple | str | None,
    egress: tuple | str | None,
    c2s_bytes: int,
    s2c_bytes: int,
    spliced_bytes: int,
    copied_bytes: int,
    duration: float,
    reason: str,
    errno: int = 0,
    protocol: str = "tcp",
    c2s_dgrams: int | None = None,
    s2c_dgrams: int | None = None,
) -> None:
    """Emit the record at INFO (cheap no-op when ``relay.flow`` is not enabled for INFO)."""
    if not FLOW_LOGGER.isEnabledFor(logging.INFO):
        return
    client_s = format_addr(client)
    dest_s = format_addr(dest)
    egress_s = format_addr(egress)
    err_name = errno_mod.errorcode.get(errno, str(errno)) if errno else ""
    # The message is just "flow": the formatters print every field from extra (text: key=value
    # after the message, json: members), so repeating them in the message would double the line.
    FLOW_LOGGER.info(
        "flow",
        extra={
            "listener": listener,
            "client": client_s,
            "dest": dest_s,
            "egress": egress_s,
            "c2s_bytes": c2s_bytes,
            "s2c_bytes": s2c_bytes,
            "spliced_bytes": spliced_bytes,
            "copied_bytes": copied_bytes,
            "duration": round(duration, 6),
            "reason": reason,
            "errno": err_name,
            "protocol": protocol,
            **({} if c2s_dgrams is None else {"c2s_dgrams": c2s_dgrams, "s2c_dgrams": s2c_dgrams}),
        },
    )
