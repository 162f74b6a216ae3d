"""Run several crawler processes as one measurable process tree (fallbacks of ``bench/run.py``).

``python bench/multi.py SPEC.json`` where SPEC is::

    {"redis": false, "seed": [...cmd...] or null,
     "procs": [{"cmd": [...], "env": {...}}, ...], "cwd": DIR, "timeout": SECONDS}

With ``"redis": true`` a private ``redis-server`` on a free loopback port is
started first (:class:`hexscrape.redisserver.RedisServer`, never the machine's
6379), ``REDIS_URL`` is added to every child's environment, the ``seed``
command runs to completion, then all ``procs`` run in parallel; the server is
stopped at the end. Used when ``run_cluster.py`` is not usable: ``redis``
mode is a shared frontier without the primary, ``split`` mode is independent
processes on split URL files. Exits with the worst child exit status; bounded
by ``timeout``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    deadline = time.monotonic() + float(spec.get("timeout", 600))
    cwd = spec.get("cwd") or str(REPO)
    server = None
    extra: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if spec.get("redis"):
            from hexscrape.redisserver import RedisServer

            server = RedisServer().start()
            extra["REDIS_URL"] = server.url
        if spec.get("seed"):
            env = {**os.environ, **extra}
            rc = subprocess.run(spec["seed"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                timeout=max(1.0, deadline - time.monotonic()), check=False).returncode
            if rc != 0:
                print(f"multi: seeding failed with exit {rc}", file=sys.stderr)
                return rc
        for p in spec["procs"]:
            env = {**os.environ, **p.get("env", {}), **extra}
            procs.append(subprocess.Popen(p["cmd"], cwd=cwd, env=env, stdin=subprocess.DEVNULL))
        worst = 0
        for proc in procs:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
            worst = worst or rc
        return worst
    except subprocess.TimeoutExpired:
        print("multi: timed out", file=sys.stderr)
        return 124
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
