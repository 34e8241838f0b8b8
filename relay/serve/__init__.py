"""The data side of a worker: the server loop, routing, destination policy, soft-unicast egress,
flow log and PROXY protocol."""
