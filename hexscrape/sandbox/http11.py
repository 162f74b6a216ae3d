"""Minimal HTTP/1.1 parsing helpers shared by the origin and the gateway.

Hand-written rather than ``http.server``/``h11`` because the sandbox must push
thousands of requests per second on one event loop: everything here works on
``bytes`` with a handful of C-level ``split``/``find`` calls per message.
"""

from __future__ import annotations

from http import HTTPStatus

MAX_HEAD = 64 * 1024

Headers = list[tuple[bytes, bytes]]


class HTTPParseError(ValueError):
    """Malformed HTTP message head; the peer gets a 400 and the connection closes."""


def parse_head(head: bytes) -> tuple[bytes, Headers, dict[bytes, bytes]]:
    """Split a message head (without the final blank line).

    Returns the start line, the headers in order, and a dict keyed by lower-cased
    name (duplicate values joined with ``, ``) for cheap lookups.
    """
    lines = head.split(b"\r\n")
    start = lines[0]
    headers: Headers = []
    lower: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise HTTPParseError("bad header line")
        value = value.strip()
        headers.append((name, value))
        lname = name.lower()
        old = lower.get(lname)
        lower[lname] = value if old is None else old + b", " + value
    return start, headers, lower


def parse_request_line(start: bytes) -> tuple[bytes, bytes, bytes]:
    """``GET /x HTTP/1.1`` -> (method, target, version)."""
    parts = start.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HTTPParseError("bad request line")
    return parts[0], parts[1], parts[2]


def parse_status_line(start: bytes) -> tuple[bytes, int]:
    """``HTTP/1.1 200 OK`` -> (version, status)."""
    parts = start.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HTTPParseError("bad status line")
    try:
        return parts[0], int(parts[1])
    except ValueError:
        raise HTTPParseError("bad status code") from None


def content_length(lower: dict[bytes, bytes]) -> int | None:
    """Content-Length value, or None when absent; raises on garbage."""
    raw = lower.get(b"content-length")
    if raw is None:
        return None
    if b"," in raw:  # repeated identical headers were joined
        vals = {v.strip() for v in raw.split(b",")}
        if len(vals) != 1:
            raise HTTPParseError("conflicting Content-Length")
        raw = vals.pop()
    if not raw.isdigit():
        raise HTTPParseError("bad Content-Length")
    return int(raw)


def is_chunked(lower: dict[bytes, bytes]) -> bool:
    te = lower.get(b"transfer-encoding")
    return te is not None and te.lower().rstrip().endswith(b"chunked")


def wants_close(version: bytes, lower: dict[bytes, bytes]) -> bool:
    """Whether the peer asked (or HTTP/1.0 implies) closing after this message."""
    conn = lower.get(b"connection")
    if conn is not None:
        conn = conn.lower()
        if b"close" in conn:
            return True
        if b"keep-alive" in conn:
            return False
    return version == b"HTTP/1.0"


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, reason(status))


def simple_response(
    status: int,
    body: bytes = b"",
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
) -> bytes:
    """Serialize a complete response with Content-Length framing."""
    parts = [status_line(status)]
    if content_type and body:
        parts.append(b"Content-Type: " + content_type + b"\r\n")
    parts.append(b"Content-Length: %d\r\n" % len(body))
    if extra:
        for k, v in extra:
            parts.append(k + b": " + v + b"\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


class ChunkedTracker:
    """Follow chunked framing of a byte stream without decoding it.

    The gateway passes chunked bodies through verbatim; it only needs to know
    where the message ends so the next response on the connection can start.
    ``feed`` returns the number of bytes of ``data`` belonging to this message
    and sets ``done`` once the terminating chunk and trailers were seen.
    """

    __slots__ = ("done", "_state", "_remaining", "_line")

    _SIZE, _DATA, _TRAILER = 0, 1, 2

    def __init__(self) -> None:
        self.done = False
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""

    def feed(self, data: bytes) -> int:
        pos = 0
        n = len(data)
        while pos < n and not self.done:
            if self._state == self._DATA:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._SIZE
                continue
            end = data.find(b"\n", pos)
            if end == -1:
                self._line += data[pos:]
                if len(self._line) > 8192:
                    raise HTTPParseError("chunk line too long")
                return n
            line = (self._line + data[pos:end]).rstrip(b"\r")
            self._line = b""
            pos = end + 1
            if self._state == self._SIZE:
                if not line:  # CRLF after a data chunk
                    continue
                size_txt = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_txt, 16)
                except ValueError:
                    raise HTTPParseError("bad chunk size") from None
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._remaining = size
                    self._state = self._DATA
            else:  # trailers until an empty line
                if not line:
                    self.done = True
        return pos
