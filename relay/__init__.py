"""relay: a transparent TCP relay with a zero-copy core (io_uring + splice)."""

from relay._version import __version__
from relay.embed import Relay, SpliceResult, splice
from relay.embed_serve import Server, start_server

__all__ = ["Relay", "Server", "SpliceResult", "__version__", "splice", "start_server"]
