"""relay: a transparent TCP relay with a zero-copy core (io_uring + splice)."""

from relay._version import __version__
from relay.embed import Relay, SpliceResult, splice

__all__ = ["Relay", "SpliceResult", "__version__", "splice"]
