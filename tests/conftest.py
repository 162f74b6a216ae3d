"""Shared fixtures: one sandbox and one private redis-server per test session.

Everything runs on loopback; the machine's own Redis on 6379 is never used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "s3cr:et/p@ss w%rd"  # characters that need percent-encoding
USER = "sandbox"


@pytest.fixture(scope="session")
def sandbox_session():
    from hexscrape.sandbox import Sandbox

    with Sandbox(user=USER, password=PASSWORD) as sb:
        yield sb


@pytest.fixture
def sandbox(sandbox_session):
    """The shared sandbox with logs, counters and faults reset for this test."""
    sandbox_session.reset()
    yield sandbox_session
    sandbox_session.reset()


@pytest.fixture(scope="session")
def redis_server_session():
    from hexscrape.redisserver import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server_session) -> Iterator[str]:
    """URL of the private redis-server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server_session.url)
    client.flushall()
    yield redis_server_session.url
    client.flushall()
    client.close()


def crawler_env(sandbox=None, **extra: object) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HEX_", "SESSION_", "WORKER_", "REDIS_"))
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if sandbox is not None:
        env.update(sandbox.env())
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


@dataclass
class CrawlResult:
    returncode: int
    stdout: str
    stderr: str
    items: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def crawl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "scrapy", "crawl", "ip", *args]


def run_crawl(
    tmp_path: Path,
    *args: str,
    env: dict[str, str],
    timeout: float = 120,
    output: str = "items.jsonl",
) -> CrawlResult:
    """Run ``scrapy crawl ip`` in the repo as a real process; collect items."""
    out = tmp_path / output
    stats_file = tmp_path / "stats.json"
    cmd = crawl_cmd("-O", str(out), "-s", f"HEXSCRAPE_STATS_DUMP={stats_file}", *args)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return CrawlResult(proc.returncode, proc.stdout, proc.stderr, read_jsonl(out), stats)


@pytest.fixture
def crawl(tmp_path):
    def _crawl(*args: str, env: dict[str, str], **kw) -> CrawlResult:
        return run_crawl(tmp_path, *args, env=env, **kw)

    return _crawl


# A run of ``run_cluster.py`` (local or --scrapyd), shared by test_cluster and test_scrapyd.
@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    output: Path
    stdout_path: Path
    stderr_path: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"run_cluster.py still running after {timeout}s\n{self.stderr}"
            ) from None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.output / "summary.json").read_text())

    def items(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(self.output.glob("items-*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    item = json.loads(line)
                    item["_file"] = path.name
                    out.append(item)
        return out

    def worker_log(self, slot: int) -> str:
        return (self.output / "logs" / f"worker-{slot}.log").read_text(errors="replace")
