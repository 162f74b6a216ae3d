"""``scrapy crawl`` with start-up validation and meaningful exit codes.

Scrapy's own command exits 0 whatever the finish reason, and a bad setting
shows up as a traceback from deep inside a component. A supervisor (our
primary, scrapyd, systemd) needs a one-line error and an exit code instead.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from scrapy.commands.crawl import Command as ScrapyCrawlCommand


from hexscrape.config import ConfigError
from hexscrape.exitcodes import EXIT_CONFIG, EXIT_REDIS, exit_code_for
from hexscrape.logredact import install_redaction
from hexscrape.middlewares import RedisUnavailable, crawler_config
from hexscrape.scheduler import crawler_frontier_config, redis_problem

if TYPE_CHECKING:
    import argparse


class Command(ScrapyCrawlCommand):
    def _fail(self, message: str, code: int) -> None:
        """One line on stderr; also in the log file when there is one (scrapyd
        keeps a job's stderr only in its own launcher log)."""
        print(f"hexscrape: error: {message}", file=sys.stderr)
        if self.settings is not None and self.settings.get("LOG_FILE"):
            logging.getLogger("hexscrape").error("hexscrape: error: %s", message)
        self.exitcode = code

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if len(args) != 1:
            return super().run(args, opts)
        assert self.crawler_process
        crawler = self._create_crawler(args[0])
        try:
            check = getattr(crawler.spidercls, "check_args", None)
            if check is not None:
                check(opts.spargs)
            config = crawler_config(crawler)  # may claim the session slice in Redis
            frontier = crawler_frontier_config(crawler)
            if frontier is not None and (problem := redis_problem(frontier)):
                raise RedisUnavailable(problem)
        except ConfigError as exc:
            self._fail(str(exc), EXIT_CONFIG)
            return None
        except RedisUnavailable as exc:
            self._fail(str(exc), EXIT_REDIS)
            return None
        install_redaction(config.secrets())

        self.crawler_process.crawl(crawler, **opts.spargs)
        self.crawler_process.start()
        if self.crawler_process.bootstrap_failed:
            self.exitcode = 1
            return None
        reason: Any = crawler.stats.get_value("finish_reason") if crawler.stats else None
        self.exitcode = exit_code_for(reason)
        return None



