"""Errors with one-line, user-facing messages (the CLI prints them as is)."""

from __future__ import annotations

import errno


class SandboxError(RuntimeError):
    """Configuration or startup problem; ``str()`` is a complete one-line message."""


class PortInUseError(SandboxError):
    """A listening port could not be bound."""


def listen_error(what: str, host: str, port: int, exc: OSError) -> SandboxError:
    """Turn a bind failure into a one-line error naming the component and port."""
    if exc.errno == errno.EADDRINUSE:
        return PortInUseError(f"cannot listen on {host}:{port} ({what}): port already in use")
    reason = exc.strerror or str(exc)
    return SandboxError(f"cannot listen on {host}:{port} ({what}): {reason}")
