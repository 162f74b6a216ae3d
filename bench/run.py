#!/usr/bin/env python3
"""hexscrape benchmark: throughput, CPU per request, connections and memory, on loopback.

One entry point for every measurement of issue 7. A sandbox (origin + sticky-
session gateway, ``hexscrape.sandbox``) runs in its own process on 127.0.0.1
and every crawler talks to it through the gateway; nothing else is contacted.

Sections (``--only`` picks a comma-separated subset; default: all, in this order):

  sandbox      0. the sandbox's own ceiling, driven by ``python -m hexscrape.sandbox.loadtest``
               (the sandbox must never be the bottleneck)
  baseline     5. plain Scrapy (``scrapy runspider bench/baseline_spider.py`` from a directory
               outside the project, its own HttpProxyMiddleware, one fixed session s000,
               default settings, default LOG_LEVEL) on the same URLs, plus a "tuned" plain
               Scrapy (LOG_LEVEL=INFO, 25 in flight) for reference; every CPU figure of
               hexscrape is also given as a ratio against them
  cpu          1. CPU-bound, no added latency: 1 process (``scrapy crawl ip``, in-process
               scheduler), 1 and 2 workers of ``run_cluster.py`` (shared Redis frontier)
               × 10k / 20k URLs: req/s, CPU s per 1,000 requests, wall time, peak RSS
  connections  3. gateway connections per session, requests per connection, share of
               requests on a reused connection (≥ 99 % expected), no connection carrying
               two sessions, and every session within SESSION_CONCURRENCY (origin's peak
               in-flight per exit IP; a cap-stress run makes the cap bind)
  latency      2. gateway adds 200 ms per request: 2 workers × 25 in flight (limit 250
               req/s), then 2 × 100 in flight with SESSION_CONCURRENCY raised
  memory       4. peak and final RSS of one worker over 5k, 20k, 100k requests, for a
               run_cluster.py worker (Redis frontier) and for one `scrapy crawl ip` process
               (flat: < 10 % growth from 20k to 100k); RSS sampled every 0.5 s, request
               rate from the gateway log; plot ``rate_rss_100k.png`` (needs matplotlib)
  profile      py-spy (else cProfile) profile of a 1-process CPU-bound crawl and of a
               cluster worker: top hotspots by self and inclusive time, by package

Output: ``OUT/latest.json`` (all figures, machine description, checks) and
``OUT/latest.md`` (the same as Markdown tables), plus the plot. ``--quick`` uses
tiny counts (300/600 URLs, memory 1k/2k/3k) and finishes in about a minute: a
smoke test, not publishable figures (it defaults to ``bench/results/quick``).

Every child process has a timeout and is killed with its descendants when it
overruns; the sandbox exits when this script does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H
import profiling
import report

SECTIONS = ["sandbox", "baseline", "cpu", "connections", "latency", "memory", "profile"]
POOL = 40  # sessions, as in the reference measurements
DEFAULT_SESSION_CONCURRENCY = 10  # hexscrape.config default
DEFAULT_CONCURRENT_REQUESTS = 25  # hexscrape.settings
LATENCY_MS = 200.0
IDLE_CLOSE = 1.0  # seconds the frontier must stay empty before cluster workers finish

REFERENCE = [
    "Plain Scrapy 2.19 with defaults, 10k URLs through an authenticating forward proxy, 40 sessions, "
    "1 process: ~410 req/s, 2.3 ms CPU per request (earlier measurement on this kind of machine).",
    "Node.js reference implementation: ~4,600 req/s per process, 0.21 ms CPU per request.",
    "Bare Twisted HTTP client: 0.20 ms CPU per request.",
]


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.cpu = [300, 600] if quick else [10_000, 20_000]
        self.latency = [300, 600] if quick else [5_000, 10_000]
        self.connections = 300 if quick else 10_000
        self.cap_stress = 200 if quick else 3_000
        self.memory = [1_000, 2_000, 3_000] if quick else [5_000, 20_000, 100_000]
        self.profile = 300 if quick else 10_000
        self.loadtest_seconds = 1.0 if quick else 5.0
        self.idle_close = 0.5 if quick else IDLE_CLOSE


def timeout_for(urls: int, latency_ms: float = 0.0) -> float:
    """Generous bound for one run: 90 s + 100 req/s (or the latency-bound rate)."""
    slow_rate = 100.0 if not latency_ms else min(100.0, 20_000 / latency_ms)
    return 90.0 + urls / slow_rate


# -- machine ------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=H.REPO, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def code_fingerprint() -> str:
    """Hash of the code under test (hexscrape/, run_cluster.py, settings files): other engineers
    edit the tree while benchmarks run, and every run records what it measured."""
    import hashlib

    h = hashlib.sha1()
    files = sorted(H.REPO.glob("hexscrape/**/*.py")) + [H.REPO / n for n in ("run_cluster.py", "scrapy.cfg")]
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        h.update(str(f.relative_to(H.REPO)).encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:10]


def machine() -> dict[str, Any]:
    import OpenSSL
    import scrapy
    import twisted

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gb": mem_gb,
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "scrapy": scrapy.__version__,
        "twisted": twisted.__version__,
        "openssl": f"pyOpenSSL {OpenSSL.__version__}",
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- the benchmark ------------------------------------------------------------------


def _retrying(fn: Any) -> Any:
    """Re-run a measurement that other processes disturbed (see Bench._retry)."""

    @functools.wraps(fn)
    def wrapper(self: Bench, *a: Any, **kw: Any) -> dict[str, Any]:
        return self._retry(lambda: fn(self, *a, **kw))

    return wrapper


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = Sizes(args.quick)
        self.out: Path = args.out
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="hexscrape-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.sb = H.SandboxProc()
        self.results: dict[str, Any] = {}
        self.baselines: dict[tuple[str, int], dict[str, Any]] = {}
        self.two_proc = "single"
        self.cluster_ok = False
        self._n = 0
        self.no_retry = False  # profiles: the hotspots come from the last attempt's raw file
        self._url_files: dict[int, Path] = {}

    # -- helpers -----------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def urls(self, n: int) -> Path:
        if n not in self._url_files:
            self._url_files[n] = self.sb.write_urls(self.work / f"urls-{n}.txt", n)
        return self._url_files[n]

    def rundir(self, name: str) -> Path:
        self._n += 1
        d = self.work / f"{self._n:02d}-{name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def detect_two_proc(self) -> None:
        mode = self.args.two_proc
        try:
            ok = subprocess.run([sys.executable, "run_cluster.py", "--help"], cwd=H.REPO,
                                env=H.base_env(), capture_output=True, timeout=60, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        self.cluster_ok = ok
        if mode == "auto":
            mode = "cluster" if ok else "split"
        elif mode == "cluster" and not ok:
            raise H.BenchError("--two-proc cluster: `python run_cluster.py --help` fails")
        self.two_proc = mode
        self.log(f"2-process mode: {mode} (run_cluster.py usable: {ok})")

    def hex_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return H.base_env({**self.sb.env(), **(extra or {})})

    @staticmethod
    def _settings_args(settings: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for k, v in settings.items():
            out += ["-s", f"{k}={v}"]
        return out

    # -- noise control -------------------------------------------------------------

    def foreign_cpu_pct(self, seconds: float = 1.0) -> float:
        """Machine CPU (% of one core) used outside this bench and its sandbox over *seconds*."""
        import psutil

        t0, own0, sb0 = psutil.cpu_times(), H._own_cpu(), self.sb.cpu_seconds()
        time.sleep(seconds)
        t1, own1, sb1 = psutil.cpu_times(), H._own_cpu(), self.sb.cpu_seconds()
        busy = H._busy(t1) - H._busy(t0) - (own1 - own0) - (sb1 - sb0)
        return 100.0 * max(0.0, busy) / seconds

    def wait_quiet(self) -> None:
        """Wait (at most --quiet-wait s) until other processes use < --max-noise % of a core."""
        if self.args.quiet_wait <= 0:
            return
        deadline = time.monotonic() + self.args.quiet_wait
        noisy = 0.0
        while time.monotonic() < deadline:
            noisy = self.foreign_cpu_pct(1.0)
            if noisy < self.args.max_noise:
                return
            if not getattr(self, "_told_noise", False):
                self.log(f"machine busy ({noisy:.0f}% of a core used by other processes): waiting for quiet")
                self._told_noise = True
        self.log(f"still {noisy:.0f}% foreign CPU after {self.args.quiet_wait:g}s: measuring anyway")

    def _retry(self, once: Any) -> dict[str, Any]:
        best: dict[str, Any] | None = None
        tried: list[dict[str, Any]] = []
        attempts = 1 if self.no_retry else 1 + max(0, self.args.retries)
        for attempt in range(1, attempts + 1):
            self.wait_quiet()
            calib = calibrate()
            code = code_fingerprint()
            rec = once()
            rec["code"] = code if code == code_fingerprint() else f"{code}→{code_fingerprint()}"
            rec["attempt"] = attempt
            rec["calib_ms"] = round((calib + calibrate()) / 2, 1)
            tried.append({k: rec.get(k) for k in ("attempt", "rate_wall", "rate_steady", "cpu_ms_per_req",
                                                   "peak_rss_mb", "other_cpu_pct", "calib_ms", "code", "ok")})
            noise = rec.get("other_cpu_pct") or 0.0
            if best is None or (rec.get("ok"), -noise) > (best.get("ok"), -(best.get("other_cpu_pct") or 0.0)):
                best = rec
            if rec.get("ok") and noise <= self.args.max_noise:
                break
            if attempt < attempts:
                self.log(f"re-running {rec['label']}: other processes used {noise:.0f}% of a core"
                         f"{'' if rec.get('ok') else ', ' + str(rec.get('problem'))}")
        assert best is not None
        best["attempts"] = attempt
        best["attempts_detail"] = tried
        if best["kind"] == "baseline":
            self.baselines[(best["variant"], best["urls"])] = best
        else:
            self._ratios(best)
        return best

    # -- launchers -----------------------------------------------------------------

    @_retrying
    def run_single(self, name: str, n: int, settings: dict[str, Any] | None = None, *,
                   latency_ms: float = 0.0, origin_latency_ms: float = 0.0,
                   cprofile: Path | None = None, on_start: Any = None,
                   section: str, label: str) -> dict[str, Any]:
        """One ``scrapy crawl ip`` process, in-process scheduler, all 40 sessions."""
        settings = dict(settings or {})
        d = self.rundir(name)
        out, stats = d / "items.jsonl", d / "stats.json"
        cmd = [sys.executable, "-m", "scrapy", "crawl", "ip", "-a", f"urls={self.urls(n)}",
               "-O", str(out), "-s", f"HEXSCRAPE_STATS_DUMP={stats}", *self._settings_args(settings)]
        if cprofile is not None:
            cmd = [sys.executable, "-m", "cProfile", "-o", str(cprofile), *cmd[1:]]
        env = self.hex_env({"SESSION_POOL_SIZE": str(POOL), "SESSION_RANGE_START": "0",
                            "SESSION_RANGE_END": str(POOL)})
        self.sb.reset(latency_ms, origin_latency_ms)
        m = H.run_measured(name, cmd, cwd=H.REPO, env=env, sandbox=self.sb, workdir=d,
                           timeout=timeout_for(n, latency_ms + origin_latency_ms), on_start=on_start)
        items = H.count_lines([out])
        scrapy_stats = json.loads(stats.read_text()) if stats.exists() else {}
        cap = int(settings.get("SESSION_CONCURRENCY", DEFAULT_SESSION_CONCURRENCY))
        return self.summarize(m, section=section, name=name, label=label, kind="hexscrape",
                              mode="single", processes=1, urls=n, items=items, settings=settings,
                              cap=cap, latency_ms=latency_ms, scrapy_stats=scrapy_stats)

    @_retrying
    def run_multi(self, name: str, n: int, workers: int, settings: dict[str, Any] | None = None, *,
                  latency_ms: float = 0.0, section: str, label: str, mode: str | None = None,
                  on_start: Any = None) -> dict[str, Any]:
        """*workers* crawler processes: run_cluster.py, or the redis/split fallbacks."""
        mode = mode or self.two_proc
        settings = dict(settings or {})
        d = self.rundir(name)
        urls = self.urls(n)
        env = self.hex_env()
        cap = int(settings.get("SESSION_CONCURRENCY", DEFAULT_SESSION_CONCURRENCY))
        self.sb.reset(latency_ms)
        if mode == "cluster":
            cmd = [sys.executable, "run_cluster.py", "--workers", str(workers), "--pool-size", str(POOL),
                   "--urls", str(urls), "--output", str(d / "out"), "--no-progress",
                   "--idle-close", str(self.sizes.idle_close), "--shutdown-timeout", "20"]
            for k, v in settings.items():
                cmd += ["--set", f"{k}={v}"]
            m = H.run_measured(name, cmd, cwd=H.REPO, env=env, sandbox=self.sb, workdir=d,
                               timeout=timeout_for(n, latency_ms), on_start=on_start)
            item_files = sorted((d / "out").glob("items-*.jsonl"))
        else:
            procs = []
            item_files = []
            for k in range(workers):
                lo, hi = k * POOL // workers, (k + 1) * POOL // workers
                out = d / f"items-{k}.jsonl"
                item_files.append(out)
                if mode == "split":
                    part = d / f"urls-{k}.txt"
                    lines = urls.read_text().splitlines(keepends=True)
                    part.write_text("".join(lines[k::workers]))
                    args = ["-a", f"urls={part}"]
                else:  # redis: the first worker seeds nothing; the seed step does
                    args = []
                cmd = [sys.executable, "-m", "scrapy", "crawl", "ip", *args, "-O", str(out),
                       *self._settings_args(settings)]
                penv = {"SESSION_POOL_SIZE": str(POOL), "SESSION_RANGE_START": str(lo),
                        "SESSION_RANGE_END": str(hi), "WORKER_SLOT": str(k)}
                if mode == "redis":
                    penv["IDLE_CLOSE_SECONDS"] = str(self.sizes.idle_close)
                procs.append({"cmd": cmd, "env": penv})
            spec = {"redis": mode == "redis", "procs": procs, "cwd": str(H.REPO),
                    "timeout": timeout_for(n, latency_ms),
                    "seed": [sys.executable, "-m", "hexscrape.seed", str(urls)] if mode == "redis" else None}
            spec_path = d / "multi.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [sys.executable, str(H.BENCH / "multi.py"), str(spec_path)]
            m = H.run_measured(name, cmd, cwd=H.REPO, env=env, sandbox=self.sb, workdir=d,
                               timeout=timeout_for(n, latency_ms) + 30, on_start=on_start)
        items = H.count_lines(item_files)
        return self.summarize(m, section=section, name=name, label=label, kind="hexscrape",
                              mode=mode, processes=workers, urls=n, items=items, settings=settings,
                              cap=cap, latency_ms=latency_ms)

    @_retrying
    def run_baseline(self, name: str, n: int, settings: dict[str, Any] | None = None, *,
                     section: str, label: str, variant: str) -> dict[str, Any]:
        """Plain Scrapy, run from a directory outside the project (no scrapy.cfg)."""
        settings = dict(settings or {})
        d = self.rundir(name)
        out = d / "items.jsonl"
        cmd = [sys.executable, "-m", "scrapy", "runspider", str(H.BENCH / "baseline_spider.py"),
               "-a", f"urls={self.urls(n)}", "-a", f"proxy={self.sb.proxy_url('s000')}", "-O", str(out),
               *self._settings_args(settings)]
        env = {k: v for k, v in H.base_env().items() if k != "PYTHONPATH"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.sb.reset()
        m = H.run_measured(name, cmd, cwd=d, env=env, sandbox=self.sb, workdir=d, timeout=timeout_for(n))
        rec = self.summarize(m, section=section, name=name, label=label, kind="baseline",
                             mode="plain-scrapy", processes=1, urls=n, items=H.count_lines([out]),
                             settings=settings, cap=None, latency_ms=0.0)
        rec["variant"] = variant
        return rec

    # -- figures of one run ------------------------------------------------------------

    def summarize(self, m: H.Measured, *, section: str, name: str, label: str, kind: str, mode: str,
                  processes: int, urls: int, items: int, settings: dict[str, Any], cap: int | None,
                  latency_ms: float, scrapy_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        rates = H.rate_figures(m.records)
        n_req = rates.get("gateway_requests", 0)
        pf = H.process_figures(m)
        wall = m.wall_s
        rec: dict[str, Any] = {
            "section": section,
            "name": name,
            "label": label,
            "kind": kind,
            "mode": mode,
            "processes": processes,
            "urls": urls,
            "requests": n_req,
            "items": items,
            "exit_code": m.returncode,
            "timed_out": m.timed_out,
            "latency_ms": latency_ms,
            "settings": settings,
            "wall_s": round(wall, 2),
            "rate_wall": round(n_req / wall, 1) if wall > 0 else None,
            "rate_steady": rates.get("rate_steady"),
            "rate_span": rates.get("rate_span"),
            "span_s": rates.get("span_s"),
            "first_request_after_s": round(rates["first_request_ts"] - m.t0, 2) if "first_request_ts" in rates else None,
            "exit_after_last_request_s": round(m.t1 - rates["last_request_ts"], 2) if "last_request_ts" in rates else None,
            "cpu_s": round(m.cpu_s, 2),
            "cpu_ms_per_req": round(1000 * m.cpu_s / n_req, 3) if n_req else None,
            "cpu_ms_per_req_steady": H.steady_cpu(m.sampler, rates.get("steady_window"), 0.9 * n_req),
            "sandbox_cpu_s": round(m.sandbox_cpu_s, 2),
            "sandbox_cpu_pct": round(100 * m.sandbox_cpu_s / wall, 1) if wall > 0 else None,
            "other_cpu_pct": round(100 * max(0.0, m.foreign_cpu_s) / wall, 1) if wall > 0 else None,
            "steal_pct": round(100 * m.steal_s / wall, 1) if wall > 0 else None,
            "peak_rss_mb": pf["worker_peak_rss_mb"],
            "final_rss_mb": pf["worker_final_rss_mb"],
            "cpu_s_by_role_sampled": pf["cpu_s_by_role_sampled"],
            "processes_detail": pf["processes"],
            "connections": H.connection_figures(m.records, m.max_in_flight, cap),
        }
        if scrapy_stats:
            rec["scrapy_stats"] = {k: scrapy_stats.get(k) for k in (
                "downloader/request_count", "downloader/response_count", "retry/count",
                "item_scraped_count", "finish_reason", "elapsed_time_seconds", "memusage/max",
                "log_count/WARNING", "log_count/ERROR") if k in scrapy_stats}
        problems = []
        if m.timed_out:
            problems.append("timed out")
        elif m.returncode != 0:
            problems.append(f"exit {m.returncode}")
        if items != urls:
            problems.append(f"{items} items for {urls} URLs")
        rec["ok"] = not problems
        if problems:
            rec["problem"] = "; ".join(problems)
            rec["log_tail"] = _tail(m.log_path, 15)
        self._ratios(rec)
        self.log(f"{label}: {rec['rate_wall']} req/s wall, {rec['rate_steady']} steady, "
                 f"{rec['cpu_ms_per_req']} ms CPU/req, peak RSS {rec['peak_rss_mb']} MB, "
                 f"sandbox {rec['sandbox_cpu_pct']}% CPU, other processes {rec['other_cpu_pct']}%"
                 f"{'' if rec['ok'] else ' — ' + rec['problem']}")
        rec["_measured"] = m  # dropped before writing JSON
        return rec

    def _ratios(self, rec: dict[str, Any]) -> None:
        if rec["kind"] == "baseline":
            return
        for variant, key in (("default", "cpu_vs_baseline"), ("tuned", "cpu_vs_baseline_tuned")):
            b = self.baselines.get((variant, rec["urls"]))
            if b and b.get("cpu_ms_per_req") and rec.get("cpu_ms_per_req"):
                rec[key] = round(rec["cpu_ms_per_req"] / b["cpu_ms_per_req"], 3)
                if variant == "default" and b.get("rate_wall") and rec.get("rate_wall"):
                    rec["rate_vs_baseline"] = round(rec["rate_wall"] / b["rate_wall"], 3)

    # -- sections ------------------------------------------------------------------

    def section_sandbox(self) -> dict[str, Any]:
        runs = []
        for conc in (50,):
            cmd = [sys.executable, "-m", "hexscrape.sandbox.loadtest", "--gateway", self.sb.gateway_url,
                   "--user", str(self.sb.info["user"]), "--password", str(self.sb.info["password"]),
                   "--seconds", str(self.sizes.loadtest_seconds), "--concurrency", str(conc),
                   "--sessions", str(POOL), "--mode", "http", "--json"]
            self.sb.reset()
            import resource

            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            c0, t0 = self.sb.cpu_seconds(), time.time()
            proc = subprocess.run(cmd, cwd=H.REPO, env=H.base_env(), capture_output=True, text=True,
                                  timeout=60 + 4 * self.sizes.loadtest_seconds, check=False)
            wall = time.time() - t0
            c1 = self.sb.cpu_seconds()
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise H.BenchError(f"loadtest failed: {proc.stderr.strip()[-500:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            secs = float(res.get("seconds") or self.sizes.loadtest_seconds)
            res["concurrency"] = conc
            # the sandbox also idles during the load generator's start-up: use its run time
            res["sandbox_cpu_pct"] = round(100 * (c1 - c0) / secs, 1)
            client = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            res["client_cpu_pct"] = round(100 * client / wall, 1)
            runs.append(res)
            self.log(f"sandbox ceiling: {res['req_per_s']} req/s ({conc} conns), "
                     f"sandbox CPU {res['sandbox_cpu_pct']}%, errors {res['errors']}")
        self.sb.reset()
        best = max(r["req_per_s"] for r in runs)
        note = (f"Ceiling {best:,.0f} req/s over plain HTTP with keep-alive connections, the same sandbox "
                "process and settings that serve every run below (in-memory request log on). The sandbox is one "
                "asyncio thread: at ~100 % CPU the figure is its limit, below that the load generator's. "
                "A run is flagged when it gets within 50 % of this ceiling.")
        return {"loadtests": runs, "ceiling_req_s": best, "note": note}

    def section_baseline(self, sizes: list[int] | None = None) -> dict[str, Any]:
        runs = []
        for n in sizes or self.sizes.cpu:
            runs.append(self.run_baseline(f"baseline-default-{n}", n, {}, section="baseline",
                                          label=f"plain Scrapy, defaults, 1 proc, {_k(n)}",
                                          variant="default"))
            runs.append(self.run_baseline(
                f"baseline-tuned-{n}", n,
                {"LOG_LEVEL": "INFO", "CONCURRENT_REQUESTS": DEFAULT_CONCURRENT_REQUESTS,
                 "CONCURRENT_REQUESTS_PER_DOMAIN": DEFAULT_CONCURRENT_REQUESTS},
                section="baseline", label=f"plain Scrapy, INFO log + 25 in flight, 1 proc, {_k(n)}",
                variant="tuned"))
        notes = [
            "Plain Scrapy = `scrapy runspider bench/baseline_spider.py` run from a directory outside the "
            "project (no scrapy.cfg, so no hexscrape settings), proxy credentials of session s000 in "
            "`meta['proxy']` (Scrapy's HttpProxyMiddleware), same URLs, same item, `-O items.jsonl`. "
            "\"defaults\" keeps every Scrapy default (LOG_LEVEL DEBUG: one log line per request and per item; "
            "CONCURRENT_REQUESTS 16, 8 per domain); \"tuned\" only sets LOG_LEVEL=INFO and 25 in flight "
            "(hexscrape's own values), to separate framework cost from logging/concurrency defaults.",
        ]
        return {"runs": runs, "notes": notes}

    def section_baseline_cpu(self) -> dict[str, dict[str, Any]]:
        """Both sections, interleaved per URL count, so a drift of the machine's speed
        (other tenants, frequency) hits plain Scrapy and hexscrape alike."""
        base: dict[str, Any] = {}
        cpu: dict[str, Any] = {}
        for n in self.sizes.cpu:
            b = self.section_baseline([n])
            c = self.section_cpu([n])
            base = {**b, "runs": base.get("runs", []) + b["runs"]}
            cpu = {**c, "runs": cpu.get("runs", []) + c["runs"]}
        note = ("Plain Scrapy and hexscrape runs were interleaved (for each URL count: plain Scrapy, then "
                "hexscrape), so that ratios compare runs made minutes apart.")
        base["notes"] = [*base["notes"], note]
        return {"baseline": base, "cpu": cpu}

    def section_cpu(self, sizes: list[int] | None = None) -> dict[str, Any]:
        runs = []
        for n in sizes or self.sizes.cpu:
            runs.append(self.run_single(f"cpu-1proc-{n}", n, section="cpu",
                                        label=f"hexscrape 1 proc (`scrapy crawl ip`), {_k(n)}"))
            if self.two_proc == "cluster" and (not self.args.quick or n == self.sizes.cpu[0]):
                runs.append(self.run_multi(f"cpu-cluster1-{n}", n, 1, section="cpu",
                                           label=f"hexscrape run_cluster.py 1 worker, {_k(n)}"))
            runs.append(self.run_multi(f"cpu-{self.two_proc}2-{n}", n, 2, section="cpu",
                                       label=f"hexscrape {_mode_label(self.two_proc)} 2 workers, {_k(n)}"))
        notes = [
            f"2-process runs use `{_mode_label(self.two_proc)}`"
            + {"cluster": " (embedded redis-server with fsync-always AOF, shared Redis frontier, "
                          f"`--idle-close {self.sizes.idle_close:g}`); its primary, seeder and redis-server CPU is "
                          "included in CPU s. Their wall time includes seeding, worker start-up and "
                          "the idle-close wait.",
               "redis": " (a private redis-server + `python -m hexscrape.seed`, 2 `scrapy crawl ip` with "
                        "REDIS_URL; run_cluster.py was not usable).",
               "split": " (2 independent `scrapy crawl ip` processes on halves of the URL file, sessions "
                        "0-19 / 20-39: run_cluster.py was not usable and no shared frontier was used).",
               "single": ""}[self.two_proc],
            "40 sessions (`SESSION_POOL_SIZE=40`), hexscrape defaults otherwise: CONCURRENT_REQUESTS=25 per "
            "process, SESSION_CONCURRENCY=10, LOG_LEVEL=INFO, items to a JSON-lines feed.",
            "On this 2-core machine the sandbox competes with the crawlers for CPU: with 2 workers, "
            "2 workers + sandbox + (for clusters) redis-server share 2 cores, so 2-process req/s is bounded "
            "by the machine, not only by hexscrape.",
        ]
        return {"runs": runs, "two_process_mode": self.two_proc, "notes": notes}

    def section_connections(self) -> dict[str, Any]:
        n = self.sizes.connections
        runs = [self.run_single(f"conn-steady-{n}", n, section="connections",
                                label=f"connections: steady 1 proc, {_k(n)}")]
        m = self.sizes.cap_stress
        runs.append(self.run_single(
            f"conn-capstress-{m}", m,
            {"CONCURRENT_REQUESTS": 100, "CONCURRENT_REQUESTS_PER_DOMAIN": 100, "SESSION_CONCURRENCY": 2},
            origin_latency_ms=50.0, section="connections",
            label=f"connections: cap stress (100 in flight, cap 2 × 40 sessions, origin +50 ms), {_k(m)}"))
        notes = [
            "requests on a reused conn = requests that were not the first on their gateway connection "
            "(1 − connections ÷ requests). A steady run should reach ≥ 99 %; tiny --quick runs cannot "
            "(40 sessions each open at least one connection).",
            "max in flight per session = the origin's peak of concurrent requests per exit IP (one exit IP "
            "per session); it must stay ≤ SESSION_CONCURRENCY. Gateway latency is added before the origin "
            "sees a request, so the cap-stress run delays at the origin instead, where in-flight requests "
            "pile up and the cap binds (100 wanted in flight, 80 allowed).",
            "The table also lists the connection figures of the other sections' runs.",
        ]
        return {"runs": runs, "notes": notes}

    def section_latency(self) -> dict[str, Any]:
        small, large = self.sizes.latency
        runs = []
        budgets = [
            (small, {}, DEFAULT_CONCURRENT_REQUESTS, "2 workers × 25 in flight (defaults)"),
            (large, {"CONCURRENT_REQUESTS": 100, "CONCURRENT_REQUESTS_PER_DOMAIN": 100,
                     "SESSION_CONCURRENCY": 20}, 100,
             "2 workers × 100 in flight, SESSION_CONCURRENCY=20"),
        ]
        for n, settings, per_proc, text in budgets:
            rec = self.run_multi(f"latency-{per_proc}-{n}", n, 2, settings, latency_ms=LATENCY_MS,
                                 section="latency", label=f"+{LATENCY_MS:g} ms: {text}, {_k(n)}")
            budget = 2 * per_proc
            limit = budget / (LATENCY_MS / 1000.0)
            rec["in_flight_budget"] = budget
            rec["limit_req_s"] = limit
            steady = rec.get("rate_steady") or 0.0
            rec["fraction_of_limit"] = round(steady / limit, 3)
            rec["effective_in_flight"] = round(steady * LATENCY_MS / 1000.0, 1)
            runs.append(rec)
        notes = [
            "limit = total in-flight budget ÷ latency; achieved = steady rate (middle 90 % of the gateway's "
            "request timestamps). Every request is delayed 200 ms by the gateway before it is handled.",
            f"2 workers via `{_mode_label(self.two_proc)}`, 20 sessions each. With 100 in flight per worker "
            "the limit (1,000 req/s) is above what 2 CPU-bound workers reach on 2 cores: the fraction then "
            "shows the CPU ceiling, not a latency problem.",
        ]
        return {"runs": runs, "latency_ms": LATENCY_MS, "notes": notes}

    def section_memory(self) -> dict[str, Any]:
        paths = (["cluster"] if self.two_proc == "cluster" else []) + ["single"]
        small_n, large_n = self.sizes.memory[1], self.sizes.memory[-1]
        runs: list[dict[str, Any]] = []
        growth: dict[str, Any] = {}
        series: dict[str, Any] = {}
        for path in paths:
            name = "run_cluster.py 1 worker" if path == "cluster" else "1 proc (`scrapy crawl ip`)"
            mine = []
            for n in self.sizes.memory:
                label = f"memory: {name}, {_k(n)}"
                if path == "cluster":
                    rec = self.run_multi(f"mem-cluster-{n}", n, 1, section="memory", label=label, mode="cluster")
                else:
                    rec = self.run_single(f"mem-1proc-{n}", n, section="memory", label=label)
                rec["path"] = path
                mine.append(rec)
            runs += mine
            small = next(r for r in mine if r["urls"] == small_n)
            large = next(r for r in mine if r["urls"] == large_n)
            g: dict[str, Any] = {"label": name, "small_n": small_n, "large_n": large_n}
            if small.get("peak_rss_mb") and large.get("peak_rss_mb"):
                g["across_runs_pct"] = round(100 * (large["peak_rss_mb"] / small["peak_rss_mb"] - 1), 1)
            m: H.Measured = large["_measured"]
            ser, within = self._memory_series(m, small_n)
            g.update(within)
            pcts = [x for x in (g.get("across_runs_pct"), g.get("within_run_pct")) if x is not None]
            g["flat"] = bool(pcts) and all(x < 10.0 for x in pcts)
            growth[path] = g
            series[name] = ser
        res: dict[str, Any] = {"runs": runs, "growth": growth, "series": series,
                               "plot_title": f"{_k(large_n)} requests: request rate and worker RSS"}
        png = self.out / report.PLOT_NAME
        if report.plot(series, png, res["plot_title"]):
            res["plot"] = _rel(png)
        else:
            res["notes_plot"] = "matplotlib not installed: no plot (pip install -r bench/requirements.txt)"
        res["notes"] = [
            "RSS per worker sampled every 0.5 s from /proc (VmRSS; peak = VmHWM). Final RSS = the last "
            "sample before the worker exited.",
            "Two paths: a run_cluster.py worker (requests leased from the Redis frontier: the production "
            "path) and one `scrapy crawl ip -a urls=FILE` process (Scrapy's in-process scheduler).",
            "Growth within the largest run compares the worker's RSS at the sample nearest the moment its "
            f"{_k(small_n)}-th request reached the gateway with the sample nearest its last request.",
        ] + ([res["notes_plot"]] if "notes_plot" in res else [])
        return res

    def _memory_series(self, m: H.Measured, small_n: int) -> tuple[dict[str, Any], dict[str, Any]]:
        rate = H.rate_series(m.records, m.t0, 1.0)
        rss: dict[str, list[tuple[float, float]]] = {}
        workers = m.sampler.by_role("worker")
        for i, p in enumerate(sorted(workers, key=lambda p: p.first_t)):
            pts = [(round(t - m.t0, 2), round(kb / 1024, 1)) for t, kb, _cpu in p.series]
            rss[f"worker {i}"] = _downsample(pts, 1500)
        within: dict[str, Any] = {}
        ts = sorted(r[0] for r in m.records)
        if workers and len(ts) > small_n:
            w = max(workers, key=lambda p: len(p.series))
            t_small, t_end = ts[small_n - 1], ts[-1]
            a = min(w.series, key=lambda s: abs(s[0] - t_small))
            b = min(w.series, key=lambda s: abs(s[0] - t_end))
            within = {"within_run_mb_from": round(a[1] / 1024, 1), "within_run_mb_to": round(b[1] / 1024, 1),
                      "within_run_pct": round(100 * (b[1] / a[1] - 1), 1) if a[1] else None}
        return {"rate": _downsample(rate, 3000), "rss": rss}, within

    def section_profile(self) -> dict[str, Any]:
        n = self.sizes.profile
        pyspy = shutil.which("py-spy")
        self.no_retry = True
        profiles = []
        notes = []
        if pyspy:
            raw = self.work / "pyspy-1proc.txt"
            rec = self.run_single(f"profile-1proc-{n}", n, on_start=_PySpyAttach(pyspy, raw).start,
                                  section="profile", label=f"profile: hexscrape 1 proc, {_k(n)}")
            hot = profiling.parse_pyspy_raw(raw) if raw.exists() else None
            profiles.append(self._profile_entry(rec, hot, raw))
            if self.two_proc == "cluster" and not self.args.quick:
                raw2 = self.work / "pyspy-cluster1.txt"
                attach = _PySpyAttach(pyspy, raw2)
                rec2 = self.run_multi(f"profile-cluster1-{n}", n, 1, section="profile",
                                      label=f"profile: run_cluster.py worker, {_k(n)}", mode="cluster",
                                      on_start=attach.start)
                hot2 = profiling.parse_pyspy_raw(raw2) if raw2.exists() else None
                profiles.append(self._profile_entry(rec2, hot2, raw2))
            notes.append("`py-spy record --nonblocking --threads -r 250 -f raw --pid <crawler>`, attached as "
                         "soon as the crawler process exists (so most of its imports are seen and set apart). "
                         "Idle threads are not sampled, so the shares are of the process's on-CPU samples. "
                         "(Without --nonblocking py-spy counts threads blocked on a lock or socket as busy; "
                         "with it some stacks are read while they change and come out cut short, so the "
                         "inclusive shares are lower bounds; self time is exact per sample.) The "
                         "profiled runs' own req/s and CPU include the profiler's overhead. Raw collapsed "
                         "stacks (flamegraph input) are kept with --keep-work.")
        else:
            prof = self.work / "cprofile-1proc.out"
            rec = self.run_single(f"profile-1proc-{n}", n, cprofile=prof, section="profile",
                                  label=f"profile (cProfile): hexscrape 1 proc, {_k(n)}")
            hot = profiling.parse_cprofile(prof) if prof.exists() else None
            profiles.append(self._profile_entry(rec, hot, prof))
            notes.append("py-spy not installed (pip install -r bench/requirements.txt): deterministic "
                         "cProfile instead, whose overhead distorts per-call costs.")
        return {"profiles": profiles, "notes": notes}

    def _profile_entry(self, rec: dict[str, Any], hot: dict[str, Any] | None, raw: Path) -> dict[str, Any]:
        return {"label": rec["label"], "urls": rec["urls"], "rate_wall": rec.get("rate_wall"),
                "cpu_ms_per_req": rec.get("cpu_ms_per_req"), "ok": rec.get("ok"), "hotspots": hot,
                "raw": raw.name}

    # -- checks ----------------------------------------------------------------------

    def checks(self, sections: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []

        def add(name: str, passed: bool, detail: str) -> None:
            out.append({"name": name, "passed": bool(passed), "detail": detail})

        runs = [r for s in sections.values() if isinstance(s, dict) for r in s.get("runs", [])]
        bad = [r["label"] for r in runs if not r.get("ok")]
        add("every run finished with all items", not bad, ", ".join(bad) or f"{len(runs)} runs")
        codes = sorted({str(r.get("code")) for r in runs if r.get("code") and r["kind"] != "baseline"})
        add("the code under test did not change during the benchmark (hexscrape runs)", len(codes) <= 1,
            f"code fingerprint(s): {', '.join(codes) or '–'}")
        sb = sections.get("sandbox")
        if sb:
            top = max((r.get("rate_steady") or 0 for r in runs), default=0)
            add("sandbox never the bottleneck (fastest run < 50 % of its ceiling)",
                top < 0.5 * sb["ceiling_req_s"], f"fastest run {top:,.0f} req/s, ceiling {sb['ceiling_req_s']:,.0f}")
        hex_runs = [r for r in runs if r["kind"] == "hexscrape" and r.get("connections")]
        if hex_runs:
            shared = [r["label"] for r in hex_runs if r["connections"]["max_sessions_per_conn"] > 1]
            add("no gateway connection carried two sessions", not shared,
                ", ".join(shared) or f"{len(hex_runs)} hexscrape runs")
            over = [f"{r['label']} ({r['connections']['max_in_flight_per_session']} > "
                    f"{r['connections']['session_cap']})" for r in hex_runs if r["connections"].get("within_cap") is False]
            add("every session within SESSION_CONCURRENCY (origin peak in flight per exit IP)", not over,
                ", ".join(over) or f"{len(hex_runs)} hexscrape runs")
        con = sections.get("connections")
        if con:
            steady = con["runs"][0]["connections"]
            add("≥ 99 % of requests on a reused connection (steady run)", (steady["reused_pct"] or 0) >= 99.0,
                f"{steady['reused_pct']} % ({steady['connections']} connections for {steady['requests']} requests)"
                + (" — --quick runs are too short for this" if self.args.quick else ""))
            cap = con["runs"][1]["connections"]
            add("cap stress: the cap binds but is never exceeded",
                cap["max_in_flight_per_session"] == cap["session_cap"],
                f"peak {cap['max_in_flight_per_session']} per session, cap {cap['session_cap']}")
        mem = sections.get("memory")
        if mem:
            for g in mem["growth"].values():
                add(f"memory flat, {g['label']} (< 10 % growth from {_k(g['small_n'])} to {_k(g['large_n'])})",
                    g.get("flat"), f"peak RSS across runs {g.get('across_runs_pct')} %, RSS within the largest "
                    f"run {g.get('within_run_pct')} %")
        return out

    # -- driver ----------------------------------------------------------------------------

    def run(self, sections: list[str]) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {
            "schema_version": 1,
            "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv[1:],
            "quick": self.args.quick,
            "sections_run": sections,
            "machine": machine(),
            "code_start": code_fingerprint(),
            "reference": REFERENCE,
            "noise_policy": {"max_noise": self.args.max_noise, "retries": self.args.retries,
                             "quiet_wait": self.args.quiet_wait},
            "sections": {},
            "errors": [],
        }
        if self.args.merge and (self.out / "latest.json").exists():
            old = json.loads((self.out / "latest.json").read_text())
            self.results["sections"] = {k: v for k, v in old.get("sections", {}).items() if k not in sections}
            self.results["merged_from"] = old.get("generated_at")
            if "baseline" not in sections:
                for r in old.get("sections", {}).get("baseline", {}).get("runs", []):
                    self.baselines[(r.get("variant"), r.get("urls"))] = r
        self.log(f"workdir {self.work}; results to {self.out}")
        rc = 0
        with self.sb:
            self.log(f"sandbox pid {self.sb.pid}, gateway {self.sb.gateway_url}")
            self.detect_two_proc()
            self.results["two_process_mode"] = self.two_proc
            together = "baseline" in sections and "cpu" in sections
            for name in sections:
                if together and name == "cpu":
                    continue  # done with the baseline, interleaved
                self.log(f"== section {'baseline + cpu, interleaved' if together and name == 'baseline' else name}")
                try:
                    if together and name == "baseline":
                        self.results["sections"].update(self.section_baseline_cpu())
                    else:
                        self.results["sections"][name] = getattr(self, f"section_{name}")()
                except H.BenchError as exc:
                    self.log(f"section {name} failed: {exc}")
                    self.results["errors"].append(f"{name}: {exc}")
                    rc = 1
                except Exception as exc:
                    traceback.print_exc()
                    self.results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                    rc = 1
                for sec in self.results["sections"].values():
                    for r in sec.get("runs", []) if isinstance(sec, dict) else []:
                        r.pop("_measured", None)
                self.write()
        self.results["checks"] = self.checks(self.results["sections"])
        self.results["machine"]["git_commit_end"] = _git("rev-parse", "--short", "HEAD")
        self.results["code_end"] = code_fingerprint()
        runs = [r for s in self.results["sections"].values() if isinstance(s, dict) for r in s.get("runs", [])]
        if any(not r.get("ok") for r in runs if r["section"] in sections):
            rc = 1
        self.write()
        self.log(f"wrote {self.out / 'latest.json'} and {self.out / 'latest.md'}")
        return rc

    def write(self) -> None:
        clean = _strip_private(self.results)
        tmp = self.out / "latest.json.tmp"
        tmp.write_text(json.dumps(clean, indent=1, default=str) + "\n")
        tmp.replace(self.out / "latest.json")
        (self.out / "latest.md").write_text(report.render(clean))


class _PySpyAttach:
    """Attach py-spy to the first cluster worker once it exists (on_start hook)."""

    def __init__(self, pyspy: str, out: Path) -> None:
        self.pyspy = pyspy
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, root: subprocess.Popen[Any]) -> Any:
        """Attach to *root* if it is the crawler itself, else to its first worker descendant."""
        import psutil

        deadline = time.time() + 30
        pid = None
        try:
            if H.classify(psutil.Process(root.pid).cmdline()) == "worker":
                pid = root.pid
                time.sleep(0.2)  # let the interpreter come up before py-spy looks for it
        except psutil.Error:
            pass
        while time.time() < deadline and root.poll() is None and pid is None:
            try:
                for p in psutil.Process(root.pid).children(recursive=True):
                    if H.classify(p.cmdline()) == "worker":
                        pid = p.pid
                        break
            except psutil.Error:
                pass
            time.sleep(0.05)
        if pid is not None:
            self.proc = subprocess.Popen([self.pyspy, "record", "--nonblocking", "--threads", "-r", "250", "-f", "raw",
                                          "-o", str(self.out), "--pid", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def finish() -> None:
            if self.proc is not None:
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

        return finish


# -- small helpers -----------------------------------------------------------------------


def calibrate() -> float:
    """CPU ms of a fixed pure-Python loop in this process: the machine's speed right now.

    On a shared (virtual) machine the same work costs more CPU time when other tenants
    load the host; runs whose figure is well above the run's minimum are slowed that way.
    """
    t = time.process_time()
    s = 0
    for i in range(300_000):
        s += i * i
    return (time.process_time() - t) * 1000


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _mode_label(mode: str) -> str:
    return {"cluster": "run_cluster.py", "redis": "shared Redis frontier", "split": "split URL files",
            "single": "1 process"}.get(mode, mode)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(H.REPO))
    except ValueError:
        return str(p)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _downsample(pts: list[Any], limit: int) -> list[Any]:
    if len(pts) <= limit:
        return pts
    step = len(pts) / limit
    return [pts[int(i * step)] for i in range(limit)] + [pts[-1]]


def _strip_private(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_strip_private(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny counts (300/600 URLs, memory 1k/2k/3k, 1 s load test): a smoke test in about "
                        "a minute; its figures are not publishable")
    p.add_argument("--only", metavar="SECTIONS", default=None,
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all); they always run "
                        "in that order. Ratios against plain Scrapy need the baseline section in the same "
                        "run, or --merge with a latest.json that has it (same URL counts)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for latest.json, latest.md and the plot (default bench/results, or "
                        "bench/results/quick with --quick)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of an existing OUT/latest.json (re-run one section)")
    p.add_argument("--two-proc", choices=["auto", "cluster", "redis", "split"], default="auto",
                   help="how to run 2 processes: run_cluster.py (auto when `run_cluster.py --help` works), "
                        "a private Redis frontier seeded with hexscrape.seed, or independent processes "
                        "on split URL files (auto's fallback)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="scratch directory for URL files, items, logs (default: a new temp dir, deleted "
                        "unless --keep-work)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (logs, profiles)")
    p.add_argument("--max-noise", type=float, default=20.0, metavar="PCT",
                   help="other processes may use at most this %% of one core during a run; before each run "
                        "the bench waits for that (see --quiet-wait), and a run above it is repeated "
                        "(see --retries); every run reports the figure (default 20)")
    p.add_argument("--quiet-wait", type=float, default=None, metavar="SECONDS",
                   help="longest wait for a quiet machine before each run; 0 disables (default 60, "
                        "0 with --quick)")
    p.add_argument("--retries", type=int, default=None,
                   help="extra attempts for a run disturbed by other processes; the least disturbed "
                        "attempt is kept (default 1, 0 with --quick)")
    args = p.parse_args(argv)
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown:
            p.error(f"unknown section(s) {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
        args.sections = [s for s in SECTIONS if s in wanted]
    else:
        args.sections = list(SECTIONS)
    if args.out is None:
        args.out = H.BENCH / "results" / ("quick" if args.quick else "")
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 60.0
    if args.retries is None:
        args.retries = 0 if args.quick else 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    try:
        return bench.run(args.sections)
    except H.BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_work or args.workdir:
            print(f"[bench] scratch kept in {bench.work}", file=sys.stderr)
        else:
            shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
