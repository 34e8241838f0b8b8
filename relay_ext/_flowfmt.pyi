"""Type stubs for the flow log's line formatter (relay_ext/_flowfmt.pyx)."""

from collections.abc import Callable
from typing import Any, Final

RECORD_FIELDS: Final[int]
CACHE_LIMIT: Final[int]

class LineFormatter:
    def __init__(
        self,
        json: bool,
        head: Callable[[str], str],
        tail: Callable[[str, int, str], str],
        address: Callable[[Any], str],
    ) -> None: ...
    def lines(self, records: list[tuple[Any, ...]]) -> bytes: ...
