"""Operating a running relay: admin socket, Prometheus metrics, logging, nft plumbing."""
