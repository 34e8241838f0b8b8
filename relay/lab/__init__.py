"""The lab: what the demo and the tests run the relay with.

- ``relay.lab.origins``: the origin protocol (SEEN / BYTES), the threaded ``Origin`` (TCP or
  unix, optionally inside a network namespace) and its per-connection record ``Seen``.
- ``relay.lab.process``: ``RelayProcess`` (`relay run` in its own session: READY, admin socket,
  JSON flow log), ``ReadyProcess`` for helper processes, ``relay_config`` (the one TOML writer).
- ``relay.lab.netns``: network namespaces as hosts (``Topology``: per-pid names, everything
  removed on exit even on failure; ``netns_unavailable_reason`` says why it cannot work here).
- ``relay.lab.netlab``: client <-> relay host <-> origin in three namespaces, TPROXY rules from
  `relay nft`, SYN counters at the origin.
- ``relay.lab.udp``: UDP origins (one socket per address), the origin's UDP counters inside /
  outside the slices, UDP clients, dnsmasq, and the three-host lab with a UDP relay.
- ``relay.lab.quic``: an HTTP/3 server and client (aioquic) that run in the namespaces.

Nothing here imports pytest: the tests wrap the skip helpers (tests/helpers.py).
"""
