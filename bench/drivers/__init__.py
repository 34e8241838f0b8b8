"""Load drivers and measurement helpers: iperf3, request/response, idle connections, /proc."""
