"""Competitor proxies: small standalone scripts plus socat and HAProxy launch recipes."""
