"""A logging filter that keeps proxy secrets out of every log line.

Defence in depth: our own code never logs the password, but a URL with
credentials could reach a log line through a third-party message. The filter
sits on the root handlers, so it sees every record that gets written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

REDACTED = "***"
MIN_SECRET_LEN = 4  # shorter strings would mangle every log line, and hide nothing


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        if any(s in msg for s in self.secrets):
            for s in self.secrets:
                msg = msg.replace(s, REDACTED)
            record.msg, record.args = msg, None
        return True


def install_redaction(secrets: Iterable[str]) -> None:
    """Add (once) a redacting filter to every handler of the root logger."""
    secrets = [s for s in secrets if len(s) >= MIN_SECRET_LEN]
    if not secrets:
        return
    for handler in logging.getLogger().handlers:
        existing = [f for f in handler.filters if isinstance(f, RedactSecrets)]
        if existing:
            existing[0].secrets = sorted(
                set(existing[0].secrets) | set(secrets), key=len, reverse=True
            )
        else:
            handler.addFilter(RedactSecrets(secrets))
