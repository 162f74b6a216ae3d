"""Measurement plumbing for ``bench/run.py``: sandbox process, measured runs, metrics.

Everything here talks to 127.0.0.1 only: the sandbox binds loopback ports, the
URLs point at its loopback origin, the embedded Redis of ``run_cluster.py``
listens on loopback. Every child process gets a timeout and is killed (with
all its descendants) when it overruns.

CPU accounting: the crawler (or ``run_cluster.py`` primary with its workers,
seeder and embedded redis-server) is a direct child of this process and is
reaped inside the measured window, so the ``RUSAGE_CHILDREN`` delta is exactly
its process tree's CPU. The sandbox is also our child but stays alive across
runs, so it is never reaped inside a window and never counted; its own CPU is
read from /proc and reported separately. A sampler thread reads every process
of the tree every ``interval`` seconds (RSS, peak RSS = VmHWM, CPU) for the
per-role breakdown, per-worker memory and the time series.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOOPBACK = "127.0.0.1"
MB = 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark step failed (one-line message)."""


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: no stray hexscrape/Redis/Scrapy settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HEX_", "SESSION_", "WORKER_", "REDIS_", "SCRAPY_", "FRONTIER_",
                             "IDLE_CLOSE", "HEXSCRAPE_", "MEMUSAGE_", "WORKERS"))
        and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


# -- the sandbox in its own process ------------------------------------------------


class SandboxProc:
    """``bench/sandbox_host.py`` as a child process, driven over its stdin/stdout."""

    def __init__(self, max_records: int = 300_000, max_seconds: float = 4 * 3600) -> None:
        self.max_records = max_records
        self.max_seconds = max_seconds
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ps: psutil.Process | None = None

    def start(self, timeout: float = 30.0) -> SandboxProc:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "sandbox_host.py"), "--max-records", str(self.max_records),
             "--max-seconds", str(self.max_seconds)],
            cwd=REPO, env=base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._reader, daemon=True, name="sandbox-reader").start()
        self.info = self._reply(timeout)
        if self.info.get("host") != LOOPBACK:
            raise BenchError(f"sandbox is not on {LOOPBACK}: {self.info.get('host')}")
        self._ps = psutil.Process(self.proc.pid)
        return self

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BenchError("sandbox did not answer in time") from None
        if line is None:
            raise BenchError("sandbox process exited")
        return json.loads(line)

    def ctl(self, cmd: str, timeout: float = 120.0, **kw: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if not reply.get("ok"):
            raise BenchError(f"sandbox command {cmd} failed: {reply.get('error')}")
        return reply

    def reset(self, latency_ms: float = 0.0, origin_latency_ms: float = 0.0) -> None:
        self.ctl("reset")
        if latency_ms:
            self.ctl("latency", ms=latency_ms)
        if origin_latency_ms:
            self.ctl("origin_latency", ms=origin_latency_ms)

    def records(self, path: Path) -> list[list[Any]]:
        self.ctl("records", path=str(path))
        with open(path, encoding="utf-8") as f:
            recs = json.load(f)
        path.unlink()
        return recs

    def cpu_seconds(self) -> float:
        assert self._ps is not None
        t = self._ps.cpu_times()
        return t.user + t.system

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def gateway_url(self) -> str:
        return str(self.info["gateway_url"])

    @property
    def http_port(self) -> int:
        return int(self.info["http_port"])

    def env(self) -> dict[str, str]:
        return dict(self.info["env"])

    def proxy_url(self, session: str = "s000") -> str:
        """Gateway URL with one session's credentials (percent-encoded), for plain Scrapy."""
        user = quote(f"{self.info['user']}-session-{session}", safe="")
        pw = quote(str(self.info["password"]), safe="")
        return f"http://{user}:{pw}@{LOOPBACK}:{self.info['gateway_port']}"

    def write_urls(self, path: Path, count: int, start: int = 0) -> Path:
        base = f"http://{LOOPBACK}:{self.http_port}/ip?n="
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(f"{base}{i}\n" for i in range(start, start + count)))
        return path

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.ctl("quit", timeout=10)
            except (BenchError, OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> SandboxProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- process tree sampling ---------------------------------------------------------


def classify(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "redis-server" in text:
        return "redis"
    if "py-spy" in text:
        return "profiler"
    if "run_cluster.py" in text:
        return "primary"
    if "hexscrape.seed" in text:
        return "seed"
    if "scrapy" in text:
        return "worker"
    return "other"


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB from /proc, (0, 0) when gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass
class ProcInfo:
    pid: int
    role: str
    cmd: str
    first_t: float
    last_t: float = 0.0
    cpu_first: float = 0.0
    cpu_last: float = 0.0
    rss_last_kb: int = 0
    hwm_kb: int = 0
    series: list[tuple[float, int, float]] = field(default_factory=list)  # (t, rss kB, cpu s)


class TreeSampler(threading.Thread):
    """Samples RSS, peak RSS and CPU of a process and all its descendants."""

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name="tree-sampler")
        self.root_pid = root_pid
        self.interval = interval
        self.procs: dict[int, ProcInfo] = {}
        self._ps: dict[int, psutil.Process] = {}
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._stop_ev.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(10)

    def _tree(self) -> list[psutil.Process]:
        try:
            root = self._ps.get(self.root_pid) or psutil.Process(self.root_pid)
            self._ps[self.root_pid] = root
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        now = time.time()
        for p in self._tree():
            pid = p.pid
            proc = self._ps.setdefault(pid, p)
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    info = self.procs.get(pid)
                    if info is None:
                        info = self.procs[pid] = ProcInfo(
                            pid, classify(proc.cmdline()), " ".join(proc.cmdline())[:300], now,
                            cpu_first=cpu,
                        )
            except psutil.Error:
                continue
            rss, hwm = _status_kb(pid)
            if not rss:
                continue
            info.last_t = now
            info.cpu_last = cpu
            info.rss_last_kb = rss
            info.hwm_kb = max(info.hwm_kb, hwm)
            info.series.append((now, rss, cpu))

    def by_role(self, role: str) -> list[ProcInfo]:
        return [p for p in self.procs.values() if p.role == role]


def kill_tree(proc: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM the process (a primary drains its workers), then SIGKILL all that is left."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for p in [*kids]:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# -- one measured run --------------------------------------------------------------


@dataclass
class Measured:
    label: str
    cmd: list[str]
    returncode: int | None
    timed_out: bool
    t0: float
    t1: float
    cpu_s: float
    sandbox_cpu_s: float
    sampler: TreeSampler
    records: list[list[Any]]
    max_in_flight: dict[str, int]
    log_path: Path
    foreign_cpu_s: float = 0.0  # machine CPU used by processes outside the bench (noise)
    steal_s: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.t1 - self.t0


def run_measured(
    label: str,
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    sandbox: SandboxProc,
    workdir: Path,
    timeout: float,
    interval: float = 0.5,
    on_start: Any = None,
) -> Measured:
    """Run *cmd* to completion (bounded by *timeout*) and collect everything measurable."""
    log_path = workdir / f"{label}.log"
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sb0 = sandbox.cpu_seconds()
    sys0, own0 = psutil.cpu_times(), _own_cpu()
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start()
    helper = on_start(proc) if on_start is not None else None
    timed_out = False
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_tree(proc)
        rc = proc.returncode
    except BaseException:
        kill_tree(proc, grace=5)
        raise
    finally:
        t1 = time.time()
        sampler.stop()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sb1 = sandbox.cpu_seconds()
    sys1, own1 = psutil.cpu_times(), _own_cpu()
    if helper is not None:
        helper()  # e.g. reap an attached profiler: after r1, so its CPU is not counted
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    busy = _busy(sys1) - _busy(sys0)
    foreign = busy - cpu - (sb1 - sb0) - (own1 - own0)
    steal = getattr(sys1, "steal", 0.0) - getattr(sys0, "steal", 0.0)
    records = sandbox.records(workdir / f"{label}.records.json")
    mif = sandbox.ctl("max_in_flight")["max_in_flight"]
    return Measured(label, cmd, rc, timed_out, t0, t1, cpu, sb1 - sb0, sampler, records, mif, log_path,
                    foreign_cpu_s=foreign, steal_s=steal)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _busy(t: Any) -> float:
    """Machine-wide busy CPU seconds (all cores) from psutil.cpu_times(); irq/softirq time is
    left out: loopback networking of our own processes is accounted there."""
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system"))


# -- metrics -----------------------------------------------------------------------


def _quantile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def rate_figures(records: list[list[Any]]) -> dict[str, Any]:
    """Request rates from the gateway's per-request timestamps."""
    ts = sorted(r[0] for r in records)
    n = len(ts)
    out: dict[str, Any] = {"gateway_requests": n}
    if n < 2:
        return out
    span = ts[-1] - ts[0]
    lo, hi = _quantile(ts, 0.05), _quantile(ts, 0.95)
    out["first_request_ts"] = ts[0]
    out["last_request_ts"] = ts[-1]
    out["span_s"] = round(span, 3)
    out["rate_span"] = round((n - 1) / span, 1) if span > 0 else None
    out["rate_steady"] = round(0.9 * n / (hi - lo), 1) if hi > lo else None
    out["steady_window"] = [lo, hi]
    return out


def connection_figures(records: list[list[Any]], max_in_flight: dict[str, int],
                       cap: int | None) -> dict[str, Any]:
    """Connections per session, requests per connection, reuse, sessions per connection."""
    by_conn: dict[int, int] = {}
    sessions_of_conn: dict[int, set[str]] = {}
    conns_of_session: dict[str, set[int]] = {}
    statuses: dict[str, int] = {}
    for _ts, conn, session, _kind, status in records:
        by_conn[conn] = by_conn.get(conn, 0) + 1
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if session is not None:
            sessions_of_conn.setdefault(conn, set()).add(session)
            conns_of_session.setdefault(session, set()).add(conn)
    n = len(records)
    conns = len(by_conn)
    per_session = sorted(len(c) for c in conns_of_session.values())
    per_conn = sorted(by_conn.values())
    mif_vals = list(max_in_flight.values())
    out: dict[str, Any] = {
        "requests": n,
        "connections": conns,
        "sessions": len(conns_of_session),
        "statuses": statuses,
        "conns_per_session": {
            "min": per_session[0] if per_session else 0,
            "mean": round(sum(per_session) / len(per_session), 2) if per_session else 0,
            "max": per_session[-1] if per_session else 0,
        },
        "requests_per_conn": {
            "min": per_conn[0] if per_conn else 0,
            "mean": round(n / conns, 1) if conns else 0,
            "median": per_conn[len(per_conn) // 2] if per_conn else 0,
            "max": per_conn[-1] if per_conn else 0,
        },
        # every request but the first on its connection went over a reused one
        "reused_pct": round(100.0 * (n - conns) / n, 2) if n else None,
        "max_sessions_per_conn": max((len(s) for s in sessions_of_conn.values()), default=0),
        "conns_with_2plus_sessions": sum(1 for s in sessions_of_conn.values() if len(s) > 1),
        "max_in_flight_per_session": max(mif_vals, default=0),
        "session_cap": cap,
        "within_cap": (max(mif_vals, default=0) <= cap) if cap else None,
    }
    return out


def rate_series(records: list[list[Any]], t0: float, bucket: float = 1.0) -> list[tuple[float, float]]:
    """(seconds since t0, requests/s) per bucket."""
    counts: dict[int, int] = {}
    for r in records:
        k = int((r[0] - t0) // bucket)
        counts[k] = counts.get(k, 0) + 1
    if not counts:
        return []
    return [(round(k * bucket, 3), counts.get(k, 0) / bucket) for k in range(max(counts) + 1)]


def steady_cpu(sampler: TreeSampler, window: list[float] | None, requests_in_window: float,
               roles: tuple[str, ...] = ("worker",)) -> float | None:
    """CPU ms per request of *roles* between the samples closest to the steady window."""
    if not window or requests_in_window <= 0:
        return None
    lo, hi = window
    total = 0.0
    for p in sampler.procs.values():
        if p.role not in roles or len(p.series) < 2:
            continue
        a = min(p.series, key=lambda s: abs(s[0] - lo))
        b = min(p.series, key=lambda s: abs(s[0] - hi))
        if b[0] <= a[0]:
            continue
        # scale the CPU of the sampled interval to the window's duration
        total += (b[2] - a[2]) * (hi - lo) / (b[0] - a[0])
    return round(1000.0 * total / requests_in_window, 3) if total else None


def process_figures(m: Measured) -> dict[str, Any]:
    """CPU per role (sampled, approximate) and memory per process (VmHWM exact-ish)."""
    roles: dict[str, float] = {}
    procs = []
    for p in m.sampler.procs.values():
        cpu = p.cpu_last
        roles[p.role] = roles.get(p.role, 0.0) + cpu
        procs.append({
            "pid": p.pid,
            "role": p.role,
            "cpu_s_sampled": round(cpu, 2),
            "peak_rss_mb": round(p.hwm_kb / 1024, 1),
            "final_rss_mb": round(p.rss_last_kb / 1024, 1),
            "lifetime_s": round(p.last_t - p.first_t, 1),
        })
    workers = [p for p in procs if p["role"] == "worker"]
    return {
        "cpu_s_by_role_sampled": {k: round(v, 2) for k, v in sorted(roles.items())},
        "processes": sorted(procs, key=lambda p: (p["role"], p["pid"])),
        "worker_peak_rss_mb": max((w["peak_rss_mb"] for w in workers), default=None),
        "worker_final_rss_mb": max((w["final_rss_mb"] for w in workers), default=None),
    }


def count_lines(paths: list[Path]) -> int:
    n = 0
    for p in paths:
        if p.exists():
            with open(p, "rb") as f:
                n += sum(1 for line in f if line.strip())
    return n
