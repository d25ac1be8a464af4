"""JSON Lines files as an event source (one event per line, in delivery order)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from connectors.base import RawRecord


class JsonLinesSource:
    """Reads files in the order given; blank lines are skipped, every other line is one raw record."""

    def __init__(self, *, paths: list[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __iter__(self) -> Iterator[RawRecord]:
        for path in self.paths:
            with path.open("rb") as handle:
                for number, line in enumerate(handle, start=1):
                    line = line.rstrip(b"\r\n")
                    if line.strip():
                        yield RawRecord(value=line, origin=f"{path}:{number}")
