"""run_cluster.py --scrapyd end to end: two real scrapyd nodes, redis-server, sandbox.

Each node is a real ``scrapyd`` process on a free loopback port with its own
directory and scrapyd.conf. Its environment holds the proxy credentials (the
safe way) and no PYTHONPATH: jobs can only run the egg the launcher deployed.
Every wait is on an observable condition with a bounded timeout.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Run, crawler_env
from hexscrape.redisserver import free_port
from hexscrape.sessions import session_ids, slice_bounds

RUN_CLUSTER = str(REPO / "run_cluster.py")
HOST = "scrapyd.hexscrape.test"  # non-loopback: the sandbox gateway routes it to its origin
POOL = 40
FAST = ["--idle-close", "1", "--stats-interval", "0.5"]
SLOW = ["-s", "CONCURRENT_REQUESTS=2"]  # so a run lasts long enough to act on it

SCRAPYD_CONF = """\
[scrapyd]
bind_address = 127.0.0.1
http_port = {port}
eggs_dir = {dir}/eggs
logs_dir = {dir}/logs
items_dir = {dir}/items
dbs_dir = {dir}/dbs
poll_interval = 0.2
max_proc = 4
jobs_to_keep = 100
finished_to_keep = 100
"""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- scrapyd nodes ------------------------------------------------------------------------


@dataclass
class Node:
    """A real scrapyd process acting as one node of the cluster."""

    dir: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, endpoint: str, post: dict[str, str] | None = None, **query: str) -> dict:
        url = f"{self.url}/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = urllib.parse.urlencode(post).encode() if post is not None else None
        with urllib.request.urlopen(url, data=data, timeout=10) as resp:
            return json.loads(resp.read())

    def answers(self) -> bool:
        try:
            return self.api("daemonstatus.json")["status"] == "ok"
        except OSError:
            return False

    def log(self) -> str:
        """scrapyd's own log: it records every job's command line."""
        return (self.dir / "scrapyd.log").read_text(errors="replace")

    def running(self) -> dict[str, int]:
        return {j["id"]: j["pid"] for j in self.api("listjobs.json")["running"]}

    def items(self) -> dict[str, list[dict]]:
        """Items per job id, from scrapyd's items_dir feeds."""
        out = {}
        for path in (self.dir / "items").glob("hexscrape/ip/*.jl"):
            out[path.stem] = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
        return out

    def remove_project(self) -> None:
        if "hexscrape" in self.api("listprojects.json")["projects"]:
            self.api("delproject.json", post={"project": "hexscrape"})


def node_env(sandbox: Any) -> dict[str, str]:
    """The scrapyd service's environment: credentials yes, our checkout no."""
    env = crawler_env(sandbox)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def nodes(sandbox_session, tmp_path_factory) -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        for k in range(2):
            d = tmp_path_factory.mktemp(f"node{k}")
            port = free_port()
            (d / "scrapyd.conf").write_text(SCRAPYD_CONF.format(port=port, dir=d))
            with (d / "scrapyd.log").open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "scrapyd", "--pidfile", ""], cwd=d,
                    env=node_env(sandbox_session), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            started.append(Node(d, port, proc))
        for node in started:
            wait_for(lambda n=node: n.answers() or n.proc.poll() is not None, 30,
                     f"scrapyd on port {node.port}")
            assert node.proc.poll() is None, node.log()
        yield started
    finally:
        for node in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)  # scrapyd and its jobs
            node.proc.wait(10)


# -- the launcher ----------------------------------------------------------------------------


@pytest.fixture
def launch(tmp_path: Path, nodes: list[Node]) -> Iterator[Callable[..., Run]]:
    """Start ``run_cluster.py --scrapyd <both nodes>``; cancel leftovers after."""
    runs: list[Run] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Run:
        n = len(runs)
        out, err = tmp_path / f"launcher{n}.out", tmp_path / f"launcher{n}.err"
        output = tmp_path / f"out{n}"
        cmd = [sys.executable, RUN_CLUSTER, "--output", str(output), "--no-progress",
               "--scrapyd", ",".join(nd.url for nd in nodes), *args]
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env or crawler_env(None),
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True)
        run = Run(proc, output, out, err)
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(10)
    for node in nodes:  # nothing of this test may run on into the next one
        for job in node.running():
            node.api("cancel.json", post={"project": "hexscrape", "job": job, "signal": "KILL"})
        wait_for(lambda n=node: not n.running(), 20, "the nodes to be idle")


def write_urls(path: Path, n: int) -> list[str]:
    urls = [f"http://{HOST}/ip?n={i}" for i in range(n)]
    path.write_text("\n".join(urls) + "\n")
    return urls


def gateway_targets(sandbox: Any) -> Counter[str]:
    return Counter(r["target"] for r in sandbox.gateway.records() if r["kind"] == "http")


def stats_records(redis_url: str) -> list[dict[str, Any]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(f[b"record"]) for _, f in client.xrange("ip:stats")]
    finally:
        client.close()


def slot_ok(redis_url: str, slot: int) -> int:
    return max((r["requests_ok"] for r in stats_records(redis_url) if r["slot"] == str(slot)),
               default=0)


def slice_of(slot: int, workers: int = 4) -> set[str]:
    lo, hi = slice_bounds(slot, workers, POOL)
    return set(session_ids(POOL)[lo:hi])


# -- end to end ---------------------------------------------------------------------------------


def test_deploys_then_two_nodes_crawl_each_url_once_within_their_slices(
        launch, nodes, sandbox, redis_url, tmp_path):
    for node in nodes:
        node.remove_project()  # the launcher must deploy it
    sandbox.origin.set_latency(100)  # so that every job gets some of the work
    urls = write_urls(tmp_path / "urls.txt", 60)
    run = launch("--workers-per-node", "2", "--urls", str(tmp_path / "urls.txt"),
                 "--redis-url", redis_url, *FAST, *SLOW)
    assert run.wait(90) == 0, run.stderr
    err = run.stderr
    assert err.count("deployed project hexscrape version") == 2
    assert "HEX_USER, HEX_PASS, HEX_GATEWAY are not sent" in err

    seen = gateway_targets(sandbox)
    assert set(seen) == set(urls) and max(seen.values()) == 1  # each URL once, cluster-wide
    by_url = {r["target"]: r["session"] for r in sandbox.gateway.records()}
    # each job used its own slice only: its items name the session the gateway saw
    jobs = {}
    for k, node in enumerate(nodes):
        for job, items in node.items().items():
            slot = int(job.split("-")[1])
            assert slot // 2 == k, (job, node.url)  # slot k on node k // M
            jobs[slot] = items
    assert sorted(jobs) == [0, 1, 2, 3]
    assert sorted(i["url"] for items in jobs.values() for i in items) == sorted(urls)
    for slot, items in jobs.items():
        assert items, f"slot {slot} got no work"
        for item in items:
            assert item["worker"] == str(slot)
            assert by_url[item["url"]] == item["session"] in slice_of(slot)

    s = run.summary
    assert s["mode"] == "scrapyd" and s["outcome"] == "finished" and s["exit_code"] == 0
    assert s["nodes"] == [n.url for n in nodes] and s["workers"] == 4
    assert s["totals"]["requests_ok"] == 60 == s["totals"]["items"]
    assert s["respawns"] == 0 and s["frontier_done"] is True
    for slot in s["slots"]:
        assert slot["state"] == "finished" and slot["spawns"] == 1
        assert slot["node"] == nodes[slot["slot"] // 2].url
        assert [(e["reason"], e["code"]) for e in slot["exits"]] == [("finished", 0)]
    assert "event=summary outcome=finished" in err and "hexscrape run" in run.stdout
    # credentials stayed in the nodes' environment: not in scrapyd's job log, not in ours
    for node in nodes:
        assert "HEX_PASS" not in node.log() and sandbox.password not in node.log()
        assert "WORKER_SLOT=" in node.log()  # (the job settings scrapyd does record)
    assert sandbox.password not in err + run.stdout + json.dumps(s)


def test_sigterm_cancels_the_jobs_which_drain_and_leave_the_rest_in_redis(
        launch, nodes, sandbox, redis_url, tmp_path):
    import redis

    sandbox.origin.set_latency(100)
    write_urls(tmp_path / "urls.txt", 300)
    # The opt-in: credentials as job settings (they win over the nodes' environment).
    run = launch("--workers-per-node", "2", "--urls", str(tmp_path / "urls.txt"),
                 "--redis-url", redis_url, "--scrapyd-pass-credentials", *FAST, *SLOW,
                 env=crawler_env(sandbox))
    wait_for(lambda: all(slot_ok(redis_url, k) >= 2 for k in range(4)), 60, "all jobs at work")
    t0 = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == 0, run.stderr
    assert time.monotonic() - t0 < 10
    s = run.summary
    assert s["outcome"] == "drained" and s["shutdown_signal"] == "SIGTERM"
    for slot in s["slots"]:
        assert slot["state"] == "stopped" and slot["spawns"] == 1
        assert slot["exits"][-1]["reason"] == "shutdown"  # scrapyd's cancel: SIGINT, a drain
    assert all(not n.running() for n in nodes)
    # whatever was not crawled is still queued in Redis; nothing was crawled twice
    client = redis.Redis.from_url(redis_url)
    queued = client.zcard("ip:requests") + client.llen("ip:start_urls")
    client.close()
    seen = gateway_targets(sandbox)
    assert max(seen.values()) == 1 and 8 <= len(seen) < 300
    assert queued + len(seen) == 300
    assert s["totals"]["requests_ok"] == len(seen)
    # we never log them; scrapyd does (hence the default of not sending them)
    assert "--scrapyd-pass-credentials: HEX_GATEWAY, HEX_USER, HEX_PASS go to" in run.stderr
    assert sandbox.password not in run.stderr + run.stdout + json.dumps(s)
    assert any("HEX_PASS=" in n.log() for n in nodes)


def test_a_killed_job_is_rescheduled_in_its_slot_and_nothing_is_lost(
        launch, nodes, sandbox, redis_url, tmp_path):
    sandbox.origin.set_latency(100)
    urls = write_urls(tmp_path / "urls.txt", 200)
    run = launch("--workers-per-node", "2", "--urls", str(tmp_path / "urls.txt"),
                 "--redis-url", redis_url, "--respawn-delay", "0.1", *FAST, *SLOW)
    wait_for(lambda: slot_ok(redis_url, 3) >= 3, 60, "slot 3 at work")
    job, pid = wait_for(lambda: next(((j, p) for j, p in nodes[1].running().items()
                                      if j.endswith("-3-1") and p), None), 10, "slot 3's pid")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    assert run.wait(90) == 0, run.stderr

    s = run.summary
    slot3 = s["slots"][3]
    assert slot3["state"] == "finished" and slot3["spawns"] == 2
    first = slot3["exits"][0]
    assert (first["job"], first["pid"], first["reason"]) == (job, pid, None)
    assert slot3["node"] == nodes[1].url  # rescheduled on its own node
    assert [sl["spawns"] for sl in s["slots"][:3]] == [1, 1, 1]
    assert f"slot 3: job {job} on {nodes[1].url} (pid {pid}) died" in run.stderr
    assert "rescheduling in" in run.stderr
    assert slot3["error"] and not slot3["error"].startswith("no job log")  # its log's tail
    # nothing lost: every URL reached the origin (one in flight at the kill may twice)
    seen = gateway_targets(sandbox)
    assert set(seen) == set(urls)
    assert sum(seen.values()) - len(urls) <= 2
    # the successor reported under the same slot, and kept to the slot's slice
    recs = [r for r in stats_records(redis_url) if r["slot"] == "3"]
    assert {r["instance"] for r in recs} == {job, job[:-1] + "2"}
    # at work at once: the launcher released the dead job's session lease (TTL 15 s)
    first_seen = min(r["ts"] for r in recs if r["instance"] != job)
    assert first_seen - killed_at < 8
    assert set().union(*(r["sessions"] for r in recs)) <= slice_of(3)
    # (the killed job's requests after its last stats record are not in the totals)
    assert len(urls) - 20 <= s["totals"]["requests_ok"] <= sum(seen.values())


def test_a_job_failing_at_start_is_given_up_with_its_own_error(
        launch, nodes, sandbox, redis_url, tmp_path):
    urls = write_urls(tmp_path / "urls.txt", 10)
    run = launch("--workers-per-node", "1", "--urls", str(tmp_path / "urls.txt"),
                 "--redis-url", redis_url, "--max-crashes", "1", "--respawn-delay", "0.1",
                 "--slot-set", "0:SESSION_CONCURRENCY=lots", *FAST)
    assert run.wait(60) == 3, run.stderr
    s = run.summary
    assert s["outcome"] == "gave_up" and s["gave_up"] == [0]
    slot0, slot1 = s["slots"]
    assert slot0["spawns"] == 2 and all(e["reason"] is None for e in slot0["exits"])
    # the crawl command writes its one-line error to the job log too
    assert "SESSION_CONCURRENCY='lots'" in slot0["error"]
    assert "SESSION_CONCURRENCY='lots'" in nodes[0].log()
    assert slot1["state"] == "finished" and s["totals"]["requests_ok"] == len(urls)
    assert "given up after 2 crashes" in run.stderr


# -- errors, in one line ------------------------------------------------------------------------


class FakeScrapyd(http.server.ThreadingHTTPServer):
    """Answers like a scrapyd without the project, whose addversion.json fails."""

    def __init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, data: dict) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                server.paths.append(path)
                if path == "/daemonstatus.json":
                    self._answer({"status": "ok", "running": 0, "pending": 0, "finished": 0})
                elif path == "/listprojects.json":
                    self._answer({"status": "ok", "projects": []})
                else:
                    self._answer({"status": "error", "message": "unexpected"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.paths.append(self.path)
                self._answer({"status": "error",
                              "message": "RunnerError: ModuleNotFoundError: No module named "
                                         "'pkg_resources'"})

        super().__init__(("127.0.0.1", 0), Handler)
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"  # trailing slash: stripped


def run_launcher(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, RUN_CLUSTER, "--output", str(tmp_path / "o"), *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=crawler_env(None),
        check=False,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, message: str) -> str:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("run_cluster.py: error:") and message in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--scrapyd", "ftp://127.0.0.1:6800"], "is not an http(s)://host:port URL"),
    (["--scrapyd", "http://127.0.0.1:6800,http://127.0.0.1:6800/"], "listed twice"),
    (["--scrapyd", "http://127.0.0.1:6800", "-n", "2"], "use --workers-per-node"),
    (["--workers-per-node", "2"], "--workers-per-node only applies with --scrapyd"),
    (["--scrapyd", "http://127.0.0.1:6800,http://localhost:6800", "--workers-per-node", "21"],
     "nodes x --workers-per-node = 42 is larger than the session pool"),
    (["--scrapyd", "http://10.9.9.9:6800"], "pass --redis-url"),
    (["--scrapyd", "http://10.9.9.9:6800", "--redis-url", "redis://127.0.0.1:1/0"],
     "is a loopback address"),
])
def test_bad_scrapyd_arguments(tmp_path, args, message):
    assert_one_line(run_launcher(tmp_path, *args), 2, message)


def test_unreachable_node_stops_the_run_before_anything_is_seeded(tmp_path, redis_url):
    import redis

    write_urls(tmp_path / "urls.txt", 3)
    dead = f"http://user:n0tl0gged@127.0.0.1:{free_port()}"
    proc = run_launcher(tmp_path, "--scrapyd", dead, "--urls", str(tmp_path / "urls.txt"),
                        "--redis-url", redis_url)
    line = assert_one_line(proc, 6, "is unreachable")
    assert "n0tl0gged" not in proc.stderr and "***@127.0.0.1" in line
    assert redis.Redis.from_url(redis_url).zcard("ip:requests") == 0


def test_failing_deploy_is_one_line(tmp_path, redis_url):
    fake = FakeScrapyd()
    try:
        proc = run_launcher(tmp_path, "--scrapyd", fake.url, "--redis-url", redis_url)
    finally:
        fake.shutdown()
        fake.server_close()
    line = assert_one_line(proc, 6, "deploying project 'hexscrape'")
    assert "No module named 'pkg_resources'" in line and "setuptools<81" in line
    assert "/addversion.json" in fake.paths and "//listprojects.json" not in fake.paths


# -- the launcher's bookkeeping, in-process ------------------------------------------------------


class FakeNode:
    """Stands in for ScrapydNode: a job list we control, or no answer at all."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.pending: set[str] = set()
        self.running: dict[str, int] = {}
        self.finished: dict[str, str] = {}
        self.cancels: list[tuple[str, str | None]] = []
        self.settings: dict[str, dict[str, str]] = {}

    def _check(self) -> None:
        from hexscrape.scrapyd import NodeUnreachable

        if self.down:
            raise NodeUnreachable(f"scrapyd node {self.name} is unreachable: refused")

    def schedule(self, project: str, spider: str, jobid: str, settings: Any,
                 version: Any = None) -> str:
        self._check()
        self.pending.add(jobid)
        self.settings[jobid] = dict(settings)
        return jobid

    def jobs(self, project: str) -> Any:
        from hexscrape.scrapyd import JobList

        self._check()
        return JobList(frozenset(self.pending), dict(self.running), dict(self.finished))

    def log_tail(self, path: str) -> str | None:
        return None  # as for a job that died before logging

    def cancel(self, project: str, job: str, signal: str | None = None) -> str | None:
        self._check()
        self.cancels.append((job, signal))
        if job in self.pending:
            self.pending.discard(job)
            return "pending"
        return "running" if job in self.running else None


def test_launcher_tracks_jobs_and_gives_up_on_a_silent_node():
    from hexscrape.scrapyd import JobLauncher

    now = [0.0]
    launcher = JobLauncher(["http://a:1", "http://b:1"], "hexscrape", "ip", poll_interval=0,
                           node_timeout=5, clock=lambda: now[0])
    a, b = FakeNode("http://a:1"), FakeNode("http://b:1")
    launcher.nodes[0].node, launcher.nodes[1].node = a, b  # type: ignore[assignment]

    j1 = launcher.schedule(0, 0, "r-0-1", [])
    j2 = launcher.schedule(1, 0, "r-1-1", [])
    assert (j1.node_name, j2.node_name) == ("http://a:1", "http://a:1")
    a.pending.discard("r-0-1")
    a.running["r-0-1"] = 4242
    launcher.refresh()
    assert (j1.started, j1.pid, j1.end) == (True, 4242, None) and j2.end is None
    j2.stop()  # still queued: scrapyd removes it, it never ran
    launcher.refresh()
    assert j2.end is not None and (j2.end.how, j2.end.dead) == ("removed", True)
    del a.running["r-0-1"]
    a.finished["r-0-1"] = "/logs/hexscrape/ip/r-0-1.log"
    launcher.refresh()
    assert j1.end is not None and (j1.end.how, j1.end.dead) == ("finished", True)
    assert j1.log_url == "/logs/hexscrape/ip/r-0-1.log"

    # node a goes silent: its job is kept for node_timeout, then lost (not known dead)
    j3 = launcher.schedule(2, 0, "r-2-1", [])
    a.pending.discard("r-2-1")
    a.running["r-2-1"] = 4343
    launcher.refresh()
    a.down = True
    now[0] = 1.0
    launcher.refresh()
    assert j3.end is None
    j3.kill()  # cannot reach the node: retried at the next poll
    assert j3.cancel_wanted == "KILL"
    now[0] = 7.0
    launcher.refresh()
    assert j3.end is not None and (j3.end.how, j3.end.dead) == ("lost", False)
    # its successor goes to the node that answers
    j4 = launcher.schedule(2, 0, "r-2-2", [])
    assert j4.node_name == "http://b:1"
    a.down = b.down = True
    from hexscrape.scrapyd import ScrapydError

    with pytest.raises(ScrapydError, match="unreachable"):
        launcher.schedule(3, 1, "r-3-1", [])


def test_scrapyd_cluster_reschedules_elsewhere_and_releases_only_known_dead_leases(tmp_path):
    from hexscrape.cluster import BACKOFF, STARTING, STOPPED, ScrapydCluster, parse_args
    from hexscrape.scrapyd import JobLauncher

    opts = parse_args(["--scrapyd", "http://127.0.0.1:1,http://127.0.0.1:2",
                       "--workers-per-node", "1", "--respawn-delay", "0", "--output",
                       str(tmp_path), "-s", "DOWNLOAD_DELAY=1", "-s", "WORKER_SLOT=9"])
    now = [0.0]
    launcher = JobLauncher(opts.scrapyd, "hexscrape", "ip", poll_interval=0, node_timeout=5,
                           clock=lambda: now[0])
    a, b = FakeNode("http://127.0.0.1:1"), FakeNode("http://127.0.0.1:2")
    launcher.nodes[0].node, launcher.nodes[1].node = a, b  # type: ignore[assignment]
    c = ScrapydCluster(opts, launcher=launcher, pass_credentials=False, send_redis_url=True,
                       redis_url="redis://127.0.0.1:1/0",
                       worker_env={"HEX_USER": "u", "HEX_PASS": "pw", "HEX_GATEWAY": "http://g:1"})
    released: list[int] = []
    c.release_slice = lambda slot: released.append(slot.index)  # type: ignore[method-assign]
    for slot in c.slots:
        c.spawn(slot)
    job0, job1 = f"{c.run_id}-0-1", f"{c.run_id}-1-1"
    assert set(a.settings) == {job0} and set(b.settings) == {job1}  # slot k on node k // M
    sent = a.settings[job0]
    assert (sent["WORKER_SLOT"], sent["SESSION_RANGE_START"], sent["SESSION_RANGE_END"]) == (
        "0", "0", "20")  # ours win over the user's -s
    assert sent["DOWNLOAD_DELAY"] == "1" and sent["REDIS_URL"] == "redis://127.0.0.1:1/0"
    assert sent["HEXSCRAPE_INSTANCE"] == job0 and not set(sent) & {"HEX_USER", "HEX_PASS",
                                                                    "HEX_GATEWAY"}

    # node a goes silent with slot 0's job still queued: lost, rescheduled on node b,
    # and its lease is left to expire (the job might still start there)
    a.down = True
    c.reap()
    now[0] = 6.0
    c.reap()
    assert c.slots[0].state == BACKOFF and c.slots[0].exits[0]["node"] == a.name
    c.respawn_due()
    assert c.slots[0].state == STARTING and f"{c.run_id}-0-2" in b.settings
    assert released == []
    # slot 1's job ends without a final record: known dead, so its lease is released
    b.pending.discard(job1)
    b.finished[job1] = f"/logs/hexscrape/ip/{job1}.log"
    c.reap()
    c.respawn_due()
    assert released == [1] and f"{c.run_id}-1-2" in b.settings
    assert c.slots[1].error.startswith("it failed at start; the reason is in the scrapyd log")
    # a drain cancels what is queued: removed before it ran, which is a clean stop
    c.begin_drain("SIGTERM")
    assert {j for j, _ in b.cancels} == {f"{c.run_id}-0-2", f"{c.run_id}-1-2"}
    c.reap()
    assert [sl.state for sl in c.slots] == [STOPPED, STOPPED] and c.finished()
    assert c.outcome() == ("drained", 0)


def test_node_urls_lose_their_trailing_slash_and_password():
    from hexscrape.scrapyd import ScrapydNode, display_url, parse_node_urls

    assert parse_node_urls(["http://h:6800/, https://u:p@g:1/sub/"]) == [
        "http://h:6800", "https://u:p@g:1/sub"]
    assert display_url("https://u:p@g:1/sub") == "https://***@g:1/sub"
    node = ScrapydNode("https://u:p%40ss@g:1/sub")
    assert node.base == "https://g:1/sub" and node.name == "https://***@g:1/sub"
    assert node.auth == "Basic dTpwQHNz"  # u:p@ss
    with pytest.raises(ValueError, match="not an http"):
        parse_node_urls(["g:6800"])
