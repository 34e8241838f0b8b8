"""Processes: the supervisor (arbiter), workers, their heartbeat and channel, privilege drop,
fd and pipe budgets, systemd integration."""
