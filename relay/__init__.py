"""relay: a transparent TCP relay with a zero-copy core (io_uring + splice)."""

from relay._version import __version__

__all__ = ["__version__"]
