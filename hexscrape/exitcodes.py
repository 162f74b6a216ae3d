"""Exit codes of a crawler process, read by the primary and by scrapyd users.

Pure Python: the primary imports this without importing Scrapy.
"""

from __future__ import annotations

EXIT_OK = 0  # finish_reason "finished" or "shutdown" (drained on a signal)
EXIT_ERROR = 1  # unexpected error, bootstrap failure
EXIT_CONFIG = 2  # bad settings or arguments: respawning will not help
EXIT_PROXY_AUTH = 3  # the gateway rejected the credentials for every session
EXIT_REDIS = 4  # the frontier Redis was unreachable
EXIT_MEMORY = 5  # stopped by MEMUSAGE_LIMIT_MB
EXIT_ABNORMAL = 6  # any other finish reason (e.g. closespider_*)
EXIT_GATEWAY = 7  # the proxy gateway could not be reached for GATEWAY_DOWN_SECONDS

_BY_REASON = {
    "finished": EXIT_OK,
    "shutdown": EXIT_OK,
    "proxy_auth_failed": EXIT_PROXY_AUTH,
    "redis_unavailable": EXIT_REDIS,
    "memusage_exceeded": EXIT_MEMORY,
    "gateway_unavailable": EXIT_GATEWAY,
}


def exit_code_for(finish_reason: str | None) -> int:
    if finish_reason is None:
        return EXIT_ERROR
    return _BY_REASON.get(finish_reason, EXIT_ABNORMAL)
