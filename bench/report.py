"""Markdown and plot from the benchmark's JSON.

``python bench/report.py bench/results/latest.json`` re-renders ``latest.md`` (and
the plot, when matplotlib is installed) next to the JSON without re-running.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PLOT_NAME = "rate_rss_100k.png"


def _f(v: Any, nd: int = 1, suffix: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{suffix}"
    if isinstance(v, int):
        return f"{v:,}{suffix}"
    return f"{v}{suffix}"


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


def _run_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in runs:
        rows.append([
            r["label"],
            r["processes"],
            _f(r["urls"], 0),
            _f(r.get("rate_wall")),
            _f(r.get("rate_steady")),
            _f(r.get("wall_s")),
            _f(r.get("cpu_s")),
            _f(r.get("cpu_ms_per_req"), 2),
            _f(r.get("cpu_ms_per_req_steady"), 2),
            _f(r.get("cpu_vs_baseline"), 2, "×"),
            _f(r.get("cpu_vs_baseline_tuned"), 2, "×"),
            _f(r.get("rate_vs_baseline"), 2, "×"),
            _f(r.get("peak_rss_mb"), 0),
            _f(r.get("sandbox_cpu_pct"), 0, "%"),
            _f(r.get("other_cpu_pct"), 0, "%"),
            _f(r.get("calib_ms"), 1),
            "ok" if r.get("ok") else f"**{r.get('problem', 'failed')}**",
        ])
    return rows


RUN_HEADERS = [
    "run", "procs", "URLs", "req/s (wall)", "req/s (steady)", "wall s", "CPU s",
    "CPU s per 1k req (= ms/req)", "CPU ms/req steady (workers)", "CPU vs plain Scrapy (defaults)",
    "CPU vs plain Scrapy (tuned)", "req/s vs plain Scrapy", "peak RSS MB (max proc)",
    "sandbox CPU", "other processes' CPU", "speed probe ms", "status",
]


def _noise_policy(res: dict[str, Any]) -> dict[str, Any]:
    if res.get("noise_policy"):
        return dict(res["noise_policy"])
    argv = list(res.get("argv", []))
    quick = bool(res.get("quick"))

    def opt(name: str, default: float) -> float:
        for i, a in enumerate(argv):
            if a == name and i + 1 < len(argv):
                return float(argv[i + 1])
            if a.startswith(name + "="):
                return float(a.split("=", 1)[1])
        return default

    return {"max_noise": opt("--max-noise", 20.0), "retries": int(opt("--retries", 0 if quick else 1)),
            "quiet_wait": opt("--quiet-wait", 0.0 if quick else 60.0)}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    sec = res.get("sections", {})
    noise = _noise_policy(res)
    lines = [
        "# hexscrape benchmark results",
        "",
        f"Generated {res['generated_at']} by `python bench/run.py {' '.join(res.get('argv', []))}`"
        f"{' (**--quick**: tiny counts, not publishable)' if res.get('quick') else ''}; "
        f"hexscrape commit `{m.get('git_commit', '?')}`{' + uncommitted changes' if m.get('git_dirty') else ''}"
        f"{'' if m.get('git_commit_end') in (None, m.get('git_commit')) else ' at start, `' + str(m.get('git_commit_end')) + '` at the end'}; "
        f"code fingerprint `{res.get('code_start', '?')}`."
        + (f" Sections {', '.join(res.get('sections_run', []))} re-run and merged into the results of the run "
           f"generated {res['merged_from']} (every run records its own code fingerprint, checked below)."
           if res.get("merged_from") else ""),
        "",
    ]
    codes: dict[str, list[str]] = {}
    for s_ in sec.values():
        for r in s_.get("runs", []) if isinstance(s_, dict) else []:
            if r.get("code") and r.get("kind") != "baseline":  # plain Scrapy runs no hexscrape code
                codes.setdefault(str(r["code"]), []).append(r["label"])
    if len(codes) > 1:
        lines += ["**Warning: the code under test changed while the benchmark ran** (other edits to the tree); "
                  "runs per code fingerprint: "
                  + "; ".join(f"`{c}`: {len(v)} run(s), from \"{v[0]}\"" for c, v in codes.items()) + ".", ""]
    lines += [
        f"**Machine**: {m['cores']} cores, {m['cpu_model']}, {m['mem_total_gb']} GiB RAM, "
        f"{m['platform']}; Python {m['python']}, Scrapy {m['scrapy']}, Twisted {m['twisted']}, "
        f"{m.get('openssl', '')}; load average at start {m.get('loadavg_start')}.",
        "",
        "Everything runs on 127.0.0.1: the sandbox (origin + authenticating sticky-session gateway) in its own "
        "process, whose CPU is **excluded** from every CPU figure (shown separately as \"sandbox CPU\", % of one "
        "core). CPU s = user+sys of the measured process tree (crawler, or `run_cluster.py` primary + workers + "
        "seeder + embedded redis-server), from `RUSAGE_CHILDREN` deltas, start-up included. "
        "\"steady\" figures use the middle 90 % of the gateway's request timestamps (start-up and "
        "idle-close excluded); steady CPU counts worker processes only. \"other processes' CPU\" is the "
        "machine's busy CPU not used by the bench, the sandbox or the measured tree (% of one core): "
        "noise from whatever else ran; figures of runs where it is high are less reliable. "
        f"Before each run the bench waits (≤ {noise['quiet_wait']:g} s) for other processes to use < "
        f"{noise['max_noise']:g} % of a core, and a run disturbed above that is repeated up to "
        f"{noise['retries']} time(s); the least disturbed attempt is shown, every attempt is in the JSON "
        "(`attempts_detail`). \"speed probe ms\" = CPU ms of a fixed pure-Python loop timed around each run: "
        "on this shared virtual machine the same work costs more CPU when the host is busy, so CPU figures "
        "of runs with a higher probe are inflated by about that factor.",
        "",
    ]
    sb = sec.get("sandbox")
    if sb:
        lines += ["## 0. Sandbox ceiling", ""]
        rows = [[r["mode"], _f(r.get("concurrency"), 0), _f(r.get("req_per_s")), _f(r.get("errors"), 0),
                 _f(r.get("sandbox_cpu_pct"), 0, "%"), _f(r.get("client_cpu_pct"), 0, "%")]
                for r in sb["loadtests"]]
        lines += _table(["mode", "connections", "req/s", "errors", "sandbox CPU", "load-generator CPU"], rows)
        lines += ["", sb.get("note", ""), ""]

    all_runs = [r for name in ("baseline", "cpu") for r in sec.get(name, {}).get("runs", [])]
    if all_runs:
        lines += ["## 1. CPU-bound (no added latency) and 5. plain-Scrapy baseline", ""]
        lines += _table(RUN_HEADERS, _run_rows(all_runs))
        notes = [n for name in ("baseline", "cpu") for n in sec.get(name, {}).get("notes", [])]
        lines += [""] + [f"- {n}" for n in notes] + [""]

    lat = sec.get("latency")
    if lat:
        lines += ["## 2. Latency-bound (gateway adds "
                  f"{_f(lat.get('latency_ms'), 0)} ms per request)", ""]
        rows = [[r["label"], r["processes"], _f(r["in_flight_budget"], 0), _f(r["limit_req_s"], 0),
                 _f(r.get("rate_steady")), _f(r.get("fraction_of_limit"), 2),
                 _f(r.get("effective_in_flight")), _f(r.get("cpu_ms_per_req"), 2),
                 _f(r.get("sandbox_cpu_pct"), 0, "%"), _f(r.get("other_cpu_pct"), 0, "%"),
                 "ok" if r.get("ok") else f"**{r.get('problem')}**"]
                for r in lat["runs"]]
        lines += _table(["run", "procs", "in flight (total)", "limit req/s = in-flight ÷ latency",
                         "achieved req/s (steady)", "fraction of limit",
                         "effective in flight (rate × latency)", "CPU ms/req", "sandbox CPU",
                         "other processes' CPU", "status"], rows)
        lines += [""] + [f"- {n}" for n in lat.get("notes", [])] + [""]

    con = sec.get("connections")
    conn_runs = [r for name in ("baseline", "cpu", "connections", "latency", "memory")
                 for r in sec.get(name, {}).get("runs", []) if r.get("connections")]
    if conn_runs:
        lines += ["## 3. Connections (from the gateway log)", ""]
        rows = []
        for r in conn_runs:
            c = r["connections"]
            rows.append([
                r["label"], _f(c["requests"], 0), _f(c["connections"], 0), _f(c["sessions"], 0),
                f"{c['conns_per_session']['min']}/{c['conns_per_session']['mean']}/{c['conns_per_session']['max']}",
                f"{c['requests_per_conn']['mean']} (max {c['requests_per_conn']['max']})",
                _f(c.get("reused_pct"), 2, "%"), c["max_sessions_per_conn"],
                f"{c['max_in_flight_per_session']} / {c['session_cap'] if c['session_cap'] else '–'}",
            ])
        lines += _table(["run", "requests", "gateway conns", "sessions",
                         "conns per session min/mean/max", "requests per conn mean",
                         "requests on a reused conn", "max sessions on one conn",
                         "max in flight per session / cap (origin)"], rows)
        if con:
            lines += [""] + [f"- {n}" for n in con.get("notes", [])]
        lines += [""]

    mem = sec.get("memory")
    if mem:
        lines += ["## 4. Memory per worker", ""]
        rows = [[r["label"], _f(r["urls"], 0), _f(r.get("peak_rss_mb"), 0), _f(r.get("final_rss_mb"), 0),
                 _f(r.get("rate_steady")), _f(r.get("cpu_ms_per_req"), 2), _f(r.get("other_cpu_pct"), 0, "%"),
                 "ok" if r.get("ok") else f"**{r.get('problem')}**"]
                for r in mem["runs"]]
        lines += _table(["run", "requests", "worker peak RSS MB", "worker final RSS MB", "req/s (steady)",
                         "CPU ms/req", "other processes' CPU", "status"], rows)
        lines += [""]
        growth = mem.get("growth", {})
        if "small_n" in growth:  # results of the first format: one path
            growth = {"": growth}
        for g in growth.values():
            lines += [
                f"- {g.get('label', 'worker')}: peak RSS {_f(g.get('small_n'), 0)} → {_f(g.get('large_n'), 0)} "
                f"requests (separate runs) {_f(g.get('across_runs_pct'), 1, '%')}; within the largest run, RSS "
                f"when request {_f(g.get('small_n'), 0)} passed the gateway → at its last request: "
                f"{_f(g.get('within_run_mb_from'), 0)} → {_f(g.get('within_run_mb_to'), 0)} MB "
                f"({_f(g.get('within_run_pct'), 1, '%')}). Flat (< 10 %): {_f(g.get('flat'))}.",
            ]
        if mem.get("plot"):
            lines += [f"- Plot of request rate and worker RSS over time for the largest runs: `{mem['plot']}`",
                      "", f"![rate and RSS]({Path(mem['plot']).name})", ""]
        lines += [f"- {n}" for n in mem.get("notes", [])] + [""]

    prof = sec.get("profile")
    if prof:
        lines += ["## Profile: where the crawler's CPU goes", ""]
        for p in prof.get("profiles", []):
            h = p.get("hotspots") or {}
            lines += [f"### {p['label']} ({h.get('tool', '?')}, {_f(p.get('urls'), 0)} URLs, "
                      f"{_f(p.get('rate_wall'))} req/s under the profiler)", ""]
            if h.get("tool") == "py-spy":
                lines += [f"{h['samples']:,} samples, {h['startup_pct']} % of them start-up (imports), "
                          "excluded below; % of the remaining samples. Only "
                          f"{h.get('complete_stacks_pct')} % of the stacks were read complete (py-spy "
                          "--nonblocking), so inclusive figures are lower bounds. Samples with hexscrape "
                          "code on the stack (its crawl command, the trunk of everything, aside): at least "
                          f"{h.get('own_code_inclusive_pct')} %.", ""]
                if h.get("by_thread"):
                    lines += ["By thread:", ""]
                    lines += _table(["thread: first frames", "%"], [[r["name"], r["pct"]] for r in h["by_thread"]])
                    lines += [""]
            lines += ["By package (self time):", ""]
            lines += _table(["package", "%"], [[r["name"], r["pct"]] for r in h.get("by_package", [])])
            lines += ["", "Top functions by self time:", ""]
            lines += _table(["function (file)", "%"], [[r["name"], r["pct"]] for r in h.get("self", [])[:20]])
            lines += ["", "Top functions by inclusive time (lower bounds; the call trunk — runpy, the "
                      "command, the reactor loop, thread bootstraps — left out):", ""]
            lines += _table(["function (file)", "%"],
                            [[r["name"], r["pct"]] for r in h.get("inclusive", [])[:25]])
            lines += [""]
        lines += [f"- {n}" for n in prof.get("notes", [])] + [""]

    checks = res.get("checks", [])
    if checks:
        lines += ["## Checks", ""]
        lines += _table(["check", "result", "detail"],
                        [[c["name"], "pass" if c["passed"] else "**FAIL**", c["detail"]] for c in checks])
        lines += [""]

    ref = res.get("reference")
    if ref:
        lines += ["## Reference figures (given in issue 7, not measured by this run)", ""]
        lines += [f"- {r}" for r in ref] + [""]
    return "\n".join(lines).rstrip() + "\n"


def plot(series: dict[str, Any], path: Path, title: str) -> bool:
    """Request rate and per-worker RSS over time; False when matplotlib is missing.

    *series* maps a run name to ``{"rate": [(s, req/s)], "rss": {worker: [(s, MB)]}}``
    (a single run's dict is accepted too).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if "rate" in series:
        series = {"": series}
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    for i, (run, ser) in enumerate(series.items()):
        color = f"C{i}"
        rate = ser.get("rate", [])
        if rate:
            ax1.plot([p[0] for p in rate], [p[1] for p in rate], lw=0.9, color=color, label=run or None)
        for j, (name, pts) in enumerate(sorted(ser.get("rss", {}).items())):
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color=color,
                     ls=["-", "--", ":", "-."][j % 4], label=f"{run}: {name}" if run else name)
    ax1.set_ylabel("requests/s (gateway log, 1 s buckets)")
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    if len(series) > 1:
        ax1.legend(loc="lower center", fontsize=8)
    ax2.set_ylabel("RSS MB (sampled every 0.5 s)")
    ax2.set_xlabel("seconds since the run started")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3)
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "bench/results/latest.json")
    res = json.loads(path.read_text())
    mem = res.get("sections", {}).get("memory")
    if mem and mem.get("series"):
        if plot(mem["series"], path.parent / PLOT_NAME, mem.get("plot_title", "")):
            mem["plot"] = str(path.parent / PLOT_NAME)
    (path.parent / path.name.replace(".json", ".md")).write_text(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
