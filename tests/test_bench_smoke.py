"""Smoke test of the benchmark harness: ``bench/run.py --quick`` runs end to end.

No timing assertions: only that the tiny CPU and connection sections run on the
loopback sandbox, exit 0 and write the JSON (and Markdown) with the expected keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RUN_KEYS = {
    "label", "kind", "mode", "processes", "urls", "requests", "items", "exit_code", "wall_s",
    "rate_wall", "rate_steady", "cpu_s", "cpu_ms_per_req", "peak_rss_mb", "final_rss_mb",
    "sandbox_cpu_pct", "connections", "ok",
}
CONNECTION_KEYS = {
    "requests", "connections", "sessions", "conns_per_session", "requests_per_conn", "reused_pct",
    "max_sessions_per_conn", "max_in_flight_per_session", "session_cap", "within_cap",
}


def test_bench_quick_cpu_connections(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--only", "cpu,connections", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "latest.json").read_text())
    assert (out / "latest.md").read_text().startswith("# hexscrape benchmark results")

    assert res["quick"] is True
    assert res["sections_run"] == ["cpu", "connections"]
    assert not res["errors"]
    for key in ("cores", "cpu_model", "python", "scrapy", "twisted"):
        assert res["machine"][key], key
    assert res["two_process_mode"] in ("cluster", "redis", "split")

    cpu = res["sections"]["cpu"]
    assert {r["processes"] for r in cpu["runs"]} == {1, 2}
    for run in cpu["runs"]:
        assert RUN_KEYS <= run.keys(), RUN_KEYS - run.keys()
        assert run["ok"], run.get("problem")
        assert run["requests"] >= run["urls"] == run["items"]
        assert run["cpu_s"] > 0 and run["peak_rss_mb"] > 0
        assert CONNECTION_KEYS <= run["connections"].keys()

    con = res["sections"]["connections"]
    assert len(con["runs"]) == 2
    for run in con["runs"]:
        assert RUN_KEYS <= run.keys()
        c = run["connections"]
        assert CONNECTION_KEYS <= c.keys()
        assert c["max_sessions_per_conn"] == 1
        assert c["within_cap"] is True

    names = {c["name"] for c in res["checks"]}
    assert "no gateway connection carried two sessions" in names
    assert all({"name", "passed", "detail"} <= c.keys() for c in res["checks"])
