"""URL input: reading URL files and telling good URLs from bad ones.

Pure Python: shared by the ``ip`` spider and the frontier seeding command.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_URL_TEMPLATE = "https://httpbin.org/ip?n={i}"
_WHITESPACE = re.compile(r"\s")


def url_problem(url: str) -> str | None:
    """Why *url* cannot be crawled, or None when it is fine."""
    if _WHITESPACE.search(url):
        return "contains whitespace"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return f"does not parse ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not http/https"
    if not parts.hostname:
        return "has no host"
    return None


def iter_lines(source: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of a URL file or ``-`` for stdin, lazily.

    Blank lines and ``#`` comments are skipped, so files stay readable.
    """
    if source == "-":
        fh = sys.stdin
        close = False
    else:
        fh = Path(source).open(encoding="utf-8", errors="replace")
        close = True
    try:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield lineno, line
    finally:
        if close:
            fh.close()


def check_url_file(source: str) -> str | None:
    """A one-line problem with a URL file argument, or None."""
    if source == "-":
        return None
    p = Path(source)
    if not p.exists():
        return f"URL file {source!r} does not exist"
    if not p.is_file():
        return f"URL file {source!r} is not a file"
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        return f"URL file {source!r} cannot be read: {exc.strerror}"
    return None
