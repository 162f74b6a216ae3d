"""run_cluster.py end to end: real processes, real signals, sandbox and redis-server.

Every wait is on an observable condition (a stats record, gateway traffic, a
process exit) with a bounded timeout; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Run, crawler_env
from hexscrape.sessions import session_ids, slice_bounds

RUN_CLUSTER = str(REPO / "run_cluster.py")
HOST = "cluster.hexscrape.test"  # non-loopback: the sandbox gateway routes it to its origin


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """Direct children of *pid* (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start ``run_cluster.py`` as its own process group; kill leftovers after."""
    runs: list[Run] = []

    def start(*args: str, env: dict[str, str], output: Path | None = None) -> Run:
        output = output or tmp_path / "out"
        n = len(runs)
        out, err = tmp_path / f"primary{n}.out", tmp_path / f"primary{n}.err"
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(
                [sys.executable, RUN_CLUSTER, "--output", str(output), "--no-progress", *args],
                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                start_new_session=True,
            )
        run = Run(proc, output, out, err)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            for child in children_of(run.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            run.proc.kill()
            run.proc.wait(10)


def write_urls(path: Path, n: int, tag: str = "") -> list[str]:
    urls = [f"http://{HOST}/ip?n={i}{tag}" for i in range(n)]
    path.write_text("\n".join(urls) + "\n")
    return urls


def env_for(sandbox: Any, **extra: Any) -> dict[str, str]:
    return crawler_env(sandbox, HEXSCRAPE_TEST="1", **extra)


def stats_records(redis_url: str, prefix: str = "ip") -> list[dict[str, Any]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(f[b"record"]) for _, f in client.xrange(f"{prefix}:stats")]
    finally:
        client.close()


def gateway_targets(sandbox: Any) -> Counter[str]:
    return Counter(r["target"] for r in sandbox.gateway.records() if r["kind"] == "http")


def record_of_slot(redis_url: str, slot: int, min_ok: int = 0) -> dict[str, Any] | None:
    for rec in reversed(stats_records(redis_url)):
        if rec["slot"] == str(slot) and rec["requests_ok"] >= min_ok and rec["kind"] == "progress":
            return rec
    return None


def in_flight(sandbox: Any) -> int:
    """Requests the origin is holding (an earlier test's may still be there)."""
    return sum(sandbox.origin.in_flight_by_ip().values())


def request_in_flight(sandbox: Any, redis_url: str, base: int) -> bool:
    return record_of_slot(redis_url, 0) is not None and in_flight(sandbox) > base


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_metrics(port: int, *needles: str) -> str | None:
    """The metrics page once every *needles* series is above zero."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return text if all(values.get(n, 0) > 0 for n in needles) else None


SLOW = ["-s", "CONCURRENT_REQUESTS=2"]  # so a run lasts long enough to act on it
FAST_CLOSE = ["--idle-close", "1", "--stats-interval", "0.5"]

# -- no Scrapy in the primary ---------------------------------------------------------


def test_primary_imports_neither_scrapy_nor_twisted():
    code = (
        "import sys, hexscrape.cluster, hexscrape.statsagg\n"
        "bad = [m for m in ('scrapy', 'twisted') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# -- command line ------------------------------------------------------------------------


def test_help_documents_every_option_with_defaults():
    proc = subprocess.run([sys.executable, RUN_CLUSTER, "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0
    for opt in ("--workers", "--urls", "--redis-url", "--output", "--shutdown-timeout",
                "--stats-interval", "--sandbox", "--count", "--metrics-port",
                "--metrics-host", "--stats-file", "--memusage-limit-mb"):
        assert opt in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "drain after SIGTERM/Ctrl-C before SIGKILL (default: 10.0)" in text
    assert "default min(cpu count, 16)" in text and "(default: output)" in text
    assert "Exit codes: 0" in text


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--workers", "0"], {}, "--workers"),
    (["--workers", "41"], {}, "larger than the session pool"),
    (["--workers", "3", "--pool-size", "2"], {}, "larger than the session pool"),
    ([], {"WORKERS": "many"}, "WORKERS"),
    (["--bogus"], {}, "unrecognized arguments"),
    (["--urls", "/nonexistent/urls.txt"], {}, "does not exist"),
    (["--shutdown-timeout", "-1"], {}, "--shutdown-timeout"),
    (["--metrics-port", "70000"], {}, "--metrics-port"),
    (["--redis-url", "http://x"], {}, "redis://"),
    (["-n", "1"], {"HEX_USER": None, "HEX_PASS": None}, "HEX_USER is not set"),
])
def test_bad_arguments_give_a_one_line_error(tmp_path, sandbox, args, env, message):
    proc = subprocess.run(
        [sys.executable, RUN_CLUSTER, "--output", str(tmp_path / "o"), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=env_for(sandbox, **env),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("run_cluster.py: error:") and message in lines[0]
    assert "Traceback" not in proc.stderr


# -- a whole run ------------------------------------------------------------------------------


def test_three_workers_crawl_each_url_once_within_their_slices(cluster, sandbox, redis_url,
                                                               tmp_path):
    urls = write_urls(tmp_path / "urls.txt", 60)
    run = cluster("-n", "3", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  *FAST_CLOSE, env=env_for(sandbox))
    assert run.wait(90) == 0, run.stderr
    seen = gateway_targets(sandbox)
    assert set(seen) == set(urls)
    assert max(seen.values()) == 1  # each URL once, cluster-wide

    pool = session_ids(40)
    items = run.items()
    assert sorted(i["url"] for i in items) == sorted(urls)
    by_url = {r["target"]: r["session"] for r in sandbox.gateway.records()}
    for item in items:
        slot = int(item["worker"])
        assert item["_file"] == f"items-{slot}.jsonl"
        lo, hi = slice_bounds(slot, 3, 40)
        assert by_url[item["url"]] == item["session"] in pool[lo:hi]

    s = run.summary
    assert s["outcome"] == "finished" and s["exit_code"] == 0
    assert s["totals"]["requests_ok"] == len(seen) == s["totals"]["items"]
    assert s["respawns"] == 0 and s["frontier_done"] is True
    for slot in s["slots"]:
        assert slot["state"] == "finished" and slot["spawns"] == 1
        assert [e["reason"] for e in slot["exits"]] == ["finished"]
    assert "event=summary outcome=finished" in run.stderr
    assert "hexscrape run" in run.stdout  # the table
    # no credentials in what the primary prints or writes, nor in the stats stream
    records = stats_records(redis_url)
    assert {r["kind"] for r in records} == {"progress", "final"}
    text = run.stderr + run.stdout + json.dumps(s) + json.dumps(records)
    text += "".join(run.worker_log(k) for k in range(3))
    assert sandbox.password not in text and "s3cr" not in text


def test_summary_lists_the_worst_sessions(cluster, sandbox, redis_url, tmp_path):
    sandbox.gateway.ban("s025", after=0, mode="403")
    urls = write_urls(tmp_path / "urls.txt", 60)
    run = cluster("-n", "1", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  "-s", "SESSION_COOLDOWN=600", *FAST_CLOSE, env=env_for(sandbox))
    assert run.wait(90) == 0, run.stderr
    worst = run.summary["worst_sessions"]
    assert worst and worst[0]["session"] == "s025" and worst[0]["bans"] >= 1
    assert "worst sessions: s025 (" in run.stdout
    assert sorted(i["url"] for i in run.items()) == sorted(urls)  # the ban cost no URL


def test_sigkilled_worker_is_respawned_in_its_slot_and_nothing_is_lost(cluster, sandbox,
                                                                        redis_url, tmp_path):
    sandbox.origin.set_latency(60)
    urls = write_urls(tmp_path / "urls.txt", 200)
    run = cluster("-n", "2", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  "--respawn-delay", "0.1", *FAST_CLOSE, *SLOW, env=env_for(sandbox))
    rec = wait_for(lambda: record_of_slot(redis_url, 1, min_ok=5), 60, "slot 1 at work")
    os.kill(rec["pid"], signal.SIGKILL)
    assert run.wait(120) == 0, run.stderr

    s = run.summary
    slot1 = s["slots"][1]
    assert slot1["spawns"] == 2 and slot1["state"] == "finished"
    assert slot1["exits"][0]["signal"] == "SIGKILL" and slot1["exits"][0]["pid"] == rec["pid"]
    assert s["slots"][0]["spawns"] == 1
    # nothing lost: every URL has its item (one in flight at the kill may be twice)
    items = run.items()
    assert {i["url"] for i in items} == set(urls)
    lo, hi = slice_bounds(1, 2, 40)
    slice1 = set(session_ids(40)[lo:hi])
    mine = [i for i in items if i["worker"] == "1"]
    assert mine and all(i["session"] in slice1 for i in mine)
    assert {i["_file"] for i in mine} == {"items-1.jsonl"}
    # the respawned worker reported under the same slot
    instances = {r["instance"] for r in stats_records(redis_url) if r["slot"] == "1"}
    assert len(instances) == 2
    assert f"slot 1: worker pid {rec['pid']} died (SIGKILL" in run.stderr


def test_crashing_workers_back_off_then_are_given_up(cluster, sandbox, redis_url, tmp_path):
    write_urls(tmp_path / "urls.txt", 10)
    run = cluster(
        "-n", "3", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
        "--max-crashes", "2", "--respawn-delay", "0.2", "--memusage-check-interval", "0.2",
        # slot 0: a bad setting, which the crawler reports as a config error (exit 2)
        "--slot-set", "0:SESSION_CONCURRENCY=lots",
        # slot 1: an extension that cannot be imported: dies at every start
        "--slot-set", '1:EXTENSIONS={"hexscrape.no_such_module.Ext": 100}',
        # slot 2: over its memory limit at once: closes cleanly, is respawned
        "--slot-set", "2:MEMUSAGE_LIMIT_MB=1",
        *FAST_CLOSE, env=env_for(sandbox),
    )
    assert run.wait(90) == 3, run.stderr
    s = run.summary
    assert s["outcome"] == "gave_up" and s["gave_up"] == [0, 1, 2]
    slot0, slot1, slot2 = s["slots"]
    assert slot0["spawns"] == 1 and slot0["exits"][0]["code"] == 2  # never respawned
    assert "SESSION_CONCURRENCY" in slot0["error"]
    assert slot1["spawns"] == 3 and all(e["code"] == 1 for e in slot1["exits"])
    assert slot2["spawns"] == 3
    assert all((e["code"], e["reason"]) == (5, "memusage_exceeded") for e in slot2["exits"])
    err = run.stderr
    assert "slot 0: worker pid" in err and "configuration error; not respawned" in err
    assert "SESSION_CONCURRENCY='lots'" in err
    assert "respawning in 0.2s" in err and "respawning in 0.4s" in err  # backoff
    assert "given up after 3 crashes" in err
    assert "No module named 'hexscrape.no_such_module'" in err  # the worker's own words
    assert "finish reason memusage_exceeded" in err
    assert "no worker left" in err
    assert sandbox.gateway.records() == []


def test_rejected_credentials_are_given_up_at_once_and_lose_no_url(cluster, sandbox, redis_url,
                                                                    tmp_path):
    urls = write_urls(tmp_path / "urls.txt", 30)
    run = cluster(
        "-n", "1", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
        "--slot-set", "0:HEX_PASS=wrong-password",
        *FAST_CLOSE, env=env_for(sandbox),
    )
    assert run.wait(90) == 3, run.stderr  # the only slot was given up
    (slot0,) = run.summary["slots"]
    assert slot0["state"] == "gave_up" and slot0["spawns"] == 1  # not respawned
    assert slot0["exits"][0]["code"] == 3 and slot0["exits"][0]["reason"] == "proxy_auth_failed"
    assert "its proxy credentials rejected; not respawned" in run.stderr
    assert "wrong-password" not in run.stderr
    assert {r["status"] for r in sandbox.gateway.records()} == {407}
    assert run.summary["totals"]["requests_failed"] == 0  # 407s were put back, not failed
    assert run.summary["queued"] == len(urls)  # every URL still in the frontier

    sandbox.reset()
    again = cluster("-n", "1", "--redis-url", redis_url, *FAST_CLOSE, env=env_for(sandbox),
                    output=tmp_path / "out2")
    assert again.wait(90) == 0, again.stderr
    assert sorted(r["target"] for r in sandbox.gateway.records()) == sorted(urls)


# -- shutdown ------------------------------------------------------------------------------------


def test_sigterm_drains_in_time_and_a_second_run_finishes_the_rest(cluster, sandbox, tmp_path):
    """Embedded Redis: the frontier survives in OUTPUT/redis between the runs."""
    sandbox.origin.set_latency(100)
    urls = write_urls(tmp_path / "urls.txt", 120)
    out = tmp_path / "out"
    env = env_for(sandbox)
    first = cluster("-n", "2", "--urls", str(tmp_path / "urls.txt"), "--shutdown-timeout", "8",
                    *FAST_CLOSE, *SLOW, env=env, output=out)
    wait_for(lambda: len(first.items()) >= 15, 60, "some items")
    t0 = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, first.stderr
    assert time.monotonic() - t0 < 8
    s1 = first.summary
    assert s1["outcome"] == "drained" and s1["shutdown_signal"] == "SIGTERM"
    assert all(sl["state"] == "stopped" for sl in s1["slots"])
    assert all(sl["exits"][-1]["reason"] == "shutdown" for sl in s1["slots"])
    done_first = {i["url"] for i in first.items()}
    assert 15 <= len(done_first) < len(urls)
    assert (out / "redis").is_dir()  # the rest of the frontier is kept
    assert "the frontier is kept in" in first.stderr
    for slot in (0, 1):  # exactly one SIGTERM each, and never a respawn
        assert first.worker_log(slot).count("Received SIGTERM") == 1

    sandbox.origin.set_latency(0)
    second = cluster("-n", "2", *FAST_CLOSE, env=env, output=out)
    assert second.wait(90) == 0, second.stderr
    assert "resuming the frontier" in second.stderr
    items = second.items()  # both runs appended to the same files
    assert {i["url"] for i in items} == set(urls)
    assert len(items) == len(urls)  # drained means nothing was done twice
    assert second.summary["outcome"] == "finished"
    assert not (out / "redis").exists()


def test_ctrl_c_to_the_process_group_drains_rather_than_drops(cluster, sandbox, redis_url,
                                                               tmp_path):
    sandbox.origin.set_latency(150)
    write_urls(tmp_path / "urls.txt", 100)
    port = free_port()
    run = cluster("-n", "2", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  "--metrics-port", str(port), *FAST_CLOSE, *SLOW, env=env_for(sandbox))
    wait_for(lambda: record_of_slot(redis_url, 0, 2) and record_of_slot(redis_url, 1, 2),
             60, "both workers at work")
    # live figures in Prometheus' text format while the run goes on
    metrics = wait_for(lambda: scrape_metrics(
        port, 'hexscrape_requests_total{outcome="ok",slot="1"}',
        'hexscrape_session_requests_total{outcome="ok",session="s000"}',
        'hexscrape_worker_up{slot="0"}', 'hexscrape_slots{state="running"}', "hexscrape_workers",
    ), 30, "metrics")
    assert "hexscrape_frontier_queued " in metrics and "hexscrape_frontier_leased " in metrics
    # a second primary on the same output directory is refused
    other = subprocess.run([sys.executable, RUN_CLUSTER, "--output", str(run.output)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env=env_for(sandbox, REDIS_URL=redis_url))
    assert other.returncode == 2 and "another run_cluster.py is using" in other.stderr
    os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert run.wait(30) == 0, run.stderr
    s = run.summary
    assert s["outcome"] == "drained" and s["shutdown_signal"] == "SIGINT"
    for slot in (0, 1):
        log = run.worker_log(slot)
        assert log.count("Received SIGTERM") == 1 and "Received SIGINT" not in log
        assert "Closing spider (shutdown)" in log
    # whatever was not crawled is still queued in Redis
    import redis

    client = redis.Redis.from_url(redis_url)
    queued = client.zcard("ip:requests") + client.llen("ip:start_urls")
    client.close()
    assert queued + len({i["url"] for i in run.items()}) == 100


def test_worker_stuck_past_the_deadline_is_sigkilled(cluster, sandbox, redis_url, tmp_path):
    sandbox.origin.set_latency(30_000)  # a response that never comes in time
    base = in_flight(sandbox)
    write_urls(tmp_path / "urls.txt", 5)
    run = cluster("-n", "1", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  "--shutdown-timeout", "1", *FAST_CLOSE, env=env_for(sandbox))
    wait_for(lambda: request_in_flight(sandbox, redis_url, base), 60, "a request in flight")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(20) == 5, run.stderr
    assert time.monotonic() - t0 < 6
    s = run.summary
    assert s["outcome"] == "killed" and s["slots"][0]["state"] == "killed"
    assert s["slots"][0]["exits"][-1]["signal"] == "SIGKILL"
    assert "did not drain in time: SIGKILL" in run.stderr


def test_second_signal_kills_at_once(cluster, sandbox, redis_url, tmp_path):
    sandbox.origin.set_latency(30_000)
    base = in_flight(sandbox)
    write_urls(tmp_path / "urls.txt", 5)
    run = cluster("-n", "1", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  "--shutdown-timeout", "60", *FAST_CLOSE, env=env_for(sandbox))
    wait_for(lambda: request_in_flight(sandbox, redis_url, base), 60, "a request in flight")
    run.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining 1 worker" in run.stderr, 10, "the drain to begin")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(20) == 5, run.stderr
    assert time.monotonic() - t0 < 5
    assert run.summary["outcome"] == "killed"


# -- the zero-configuration demo, items on disk --------------------------------------------------


def test_sandbox_demo_runs_without_configuration(cluster, tmp_path):
    env = crawler_env(None)  # no HEX_*, no REDIS_*: all of it comes from --sandbox
    run = cluster("--sandbox", "--count", "40", "-n", "2", *FAST_CLOSE, env=env)
    assert run.wait(90) == 0, run.stderr
    items = run.items()
    assert sorted(int(i["url"].rpartition("=")[2]) for i in items) == list(range(40))
    assert {i["url"].partition(":")[0] for i in items} == {"http", "https"}
    assert all(i["status"] == 200 and i["exit_ip"] for i in items)
    s = run.summary
    assert s["outcome"] == "finished" and s["totals"]["items"] == 40
    assert "seeded the frontier from the sandbox URLs: 40 new" in run.stderr
    assert not (run.output / "redis").exists()  # embedded Redis, frontier done


def test_item_files_are_flushed_per_item(tmp_path):
    from hexscrape.cluster import FlushPerItem

    path = tmp_path / "items.jsonl"
    with path.open("ab") as raw:
        plugin = FlushPerItem(raw, {})
        plugin.write(b'{"n": 1}\n')
        assert path.read_bytes() == b'{"n": 1}\n'  # visible before close: a SIGKILL keeps it
        plugin.close()
    assert raw.closed


def test_workers_drain_by_themselves_when_the_primary_dies(cluster, sandbox, redis_url,
                                                            tmp_path):
    sandbox.origin.set_latency(150)
    write_urls(tmp_path / "urls.txt", 100)
    run = cluster("-n", "2", "--urls", str(tmp_path / "urls.txt"), "--redis-url", redis_url,
                  *FAST_CLOSE, *SLOW, env=env_for(sandbox))
    recs = wait_for(lambda: [record_of_slot(redis_url, k, 1) for k in (0, 1)]
                    if all(record_of_slot(redis_url, k, 1) for k in (0, 1)) else None,
                    60, "both workers at work")
    pids = [r["pid"] for r in recs]
    run.proc.kill()  # no chance to clean up
    run.proc.wait(10)
    try:
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 30,
                 "the orphaned workers to exit")
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    for slot in (0, 1):
        log = run.worker_log(slot)
        assert "is gone: draining and closing" in log and "Closing spider (shutdown)" in log
    finals = [r for r in stats_records(redis_url) if r["kind"] == "final"]
    assert sorted(r["finish_reason"] for r in finals) == ["shutdown", "shutdown"]


def test_seed_subcommand_queues_urls_once(sandbox, redis_url, tmp_path):
    import redis

    write_urls(tmp_path / "urls.txt", 7)
    cmd = [sys.executable, RUN_CLUSTER, "seed", str(tmp_path / "urls.txt"), "--redis-url",
           redis_url]
    for expected in ("7 new, 0 duplicate", "0 new, 7 duplicate"):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env=env_for(sandbox))
        assert proc.returncode == 0, proc.stderr
        assert expected in proc.stdout
    client = redis.Redis.from_url(redis_url)
    assert client.zcard("ip:requests") == 7
    client.close()


# -- helpers of the primary, in-process ------------------------------------------------------


def test_no_redis_server_binary_gives_the_install_hint(monkeypatch, tmp_path):
    import hexscrape.redisserver
    from hexscrape.cluster import EXIT_REDIS, ServiceError, start_embedded_redis

    monkeypatch.setattr(hexscrape.redisserver, "find_redis_server", lambda: None)
    with pytest.raises(ServiceError) as info:
        start_embedded_redis(tmp_path / "redis", fresh=False)
    assert info.value.code == EXIT_REDIS
    assert str(info.value) == hexscrape.redisserver.INSTALL_HINT


def test_redis_urls_lose_their_password_in_logs_and_summary():
    from hexscrape.config import redact_url

    assert redact_url("redis://:hunter2@db:6380/1") == "redis://:***@db:6380/1"
    assert redact_url("redis://u:hunter2@db/0") == "redis://u:***@db/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_telling_line_of_a_worker_log(tmp_path):
    from hexscrape.cluster import log_tail_error

    log = tmp_path / "w.log"
    log.write_text(
        "old run\nhexscrape: error: from an earlier spawn\n"
        "2026-01-01 [scrapy.core] ERROR: Memory usage exceeded 1MiB. Shutting down\n"
        "    'scrapy.spidermiddlewares.httperror.HttpErrorMiddleware',\n"
    )
    offset = len("old run\nhexscrape: error: from an earlier spawn\n")
    assert log_tail_error(log, offset) == "Memory usage exceeded 1MiB. Shutting down"
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\n  File x\n"
                "ModuleNotFoundError: No module named 'nope' pw=s3cret\n")
    assert log_tail_error(log, offset, ["s3cret"]) == (
        "ModuleNotFoundError: No module named 'nope' pw=***")
    assert log_tail_error(log, 0).startswith("hexscrape: error: from an earlier")
    assert log_tail_error(tmp_path / "missing.log", 0) is None


def test_environment_defaults_and_worker_settings(monkeypatch, tmp_path):
    from hexscrape.cluster import Cluster, UsageError, parse_args

    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("SESSION_POOL_SIZE", "9")
    monkeypatch.setenv("MEMUSAGE_LIMIT_MB", "512")
    opts = parse_args(["--output", str(tmp_path), "-s", "DOWNLOAD_DELAY=1",
                       "--slot-set", "2:LOG_LEVEL=DEBUG"])
    assert (opts.workers, opts.pool_size, opts.memusage_limit_mb) == (3, 9, 512)
    assert parse_args(["-n", "2", "--output", str(tmp_path)]).workers == 2  # option wins
    c = Cluster(opts, redis_url="redis://127.0.0.1:1/0", worker_env={
        "HEX_PASS": "pw", "SESSION_RANGE": "auto", "WORKER_SLOT": "7"})
    slot = c.slots[2]
    assert (slot.start, slot.end) == (6, 9)
    env = c.env_for(slot)
    assert (env["WORKER_SLOT"], env["SESSION_RANGE_START"], env["SESSION_RANGE_END"]) == (
        "2", "6", "9")
    assert env["SESSION_POOL_SIZE"] == "9" and "SESSION_RANGE" not in env
    assert env["HEX_PASS"] == "pw"  # credentials travel in the environment only
    cmd = c.worker_command(slot)
    assert cmd[1:5] == ["-m", "scrapy", "crawl", "ip"]
    assert "pw" not in " ".join(cmd)
    assert "MEMUSAGE_LIMIT_MB=512" in cmd and "DOWNLOAD_DELAY=1" in cmd
    assert "LOG_LEVEL=DEBUG" in cmd and "LOG_LEVEL=DEBUG" not in c.worker_command(c.slots[0])
    feeds = json.loads(next(a for a in cmd if a.startswith("FEEDS=")).partition("=")[2])
    (path, options), = feeds.items()
    assert path == str((tmp_path / "items-2.jsonl").resolve())
    assert options["format"] == "jsonlines" and options["overwrite"] is False
    assert options["postprocessing"] == ["hexscrape.cluster.FlushPerItem"]
    monkeypatch.setenv("WORKERS", "10")
    with pytest.raises(UsageError, match="larger than the session pool"):
        parse_args(["--output", str(tmp_path)])


def test_stats_reporter_is_off_without_redis(monkeypatch):
    from scrapy.exceptions import NotConfigured
    from scrapy.utils.test import get_crawler

    from hexscrape.extensions import StatsReporter

    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(NotConfigured):
        StatsReporter.from_crawler(get_crawler())
    with pytest.raises(NotConfigured):
        StatsReporter.from_crawler(get_crawler(settings_dict={
            "REDIS_URL": "redis://127.0.0.1:1/0", "HEXSCRAPE_STATS_INTERVAL": 0}))
    ext = StatsReporter.from_crawler(get_crawler(settings_dict={
        "REDIS_URL": "redis://127.0.0.1:1/0", "HEXSCRAPE_STATS_INTERVAL": 2}))
    assert ext.interval == 2 and ext.maxlen == 5000
