"""Gateway request log: bounded in-memory records plus optional JSON-lines file.

Tests read the in-memory copy; other processes (benchmarks, the demo) tail the
file, which is line-buffered so every record is visible as soon as it's written.
"""

from __future__ import annotations

import json
from collections import deque
from typing import IO, Any


class RequestLog:
    """Append-only log of per-request dicts; not thread-safe (loop thread only)."""

    def __init__(self, path: str | None = None, max_records: int = 100_000) -> None:
        self.path = path
        self._records: deque[dict[str, Any]] = deque(maxlen=max_records)
        self._file: IO[str] | None = None
        self.echo: IO[str] | None = None  # e.g. sys.stderr for the CLI's --verbose

    def open(self) -> None:
        """Open the JSON-lines file (append, line-buffered) if a path was given."""
        if self.path and self._file is None:
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def add(self, record: dict[str, Any]) -> None:
        self._records.append(record)
        if self._file is not None or self.echo is not None:
            line = json.dumps(record, ensure_ascii=False)
            if self._file is not None:
                self._file.write(line + "\n")
            if self.echo is not None:
                self.echo.write(line + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._records]

    def clear(self) -> None:
        self._records.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
