"""Hotspot tables from a py-spy raw (collapsed-stack) profile or a cProfile dump.

py-spy samples the crawler from outside (idle threads not sampled), so the
counts approximate where its CPU goes. Stacks that pass through the import
machinery are start-up cost and are counted apart. With ``--nonblocking``
some stacks are read while they change and lack their bottom frames, so the
inclusive figures (a frame anywhere on the sampled stack) are lower bounds;
self time (the leaf frame) is exact per sample.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _split_frame(frame: str) -> tuple[str, str]:
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def _package(file: str) -> str:
    """Top-level package/module of a py-spy file path (``twisted/web/client.py`` -> twisted)."""
    if not file:
        return "?"
    if file.startswith("<"):
        return file
    path = file.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3."):
                path = path.split("/", 1)[1] if "/" in path else path
    head = path.lstrip("/").split("/", 1)[0]
    return head.removesuffix(".py")


def _is_startup(frames: list[str]) -> bool:
    return any("_find_and_load" in f or "_call_with_frames_removed" in f for f in frames)


ROOTS = ("_run_module_as_main (", "Thread._bootstrap (", "<module> (")
"""Bottom frames of a complete stack: the main module, or a thread's bootstrap."""

TRUNK = (
    "_run_module_as_main (", "_run_code (", "<module> (scrapy/__main__", "execute (scrapy/cmdline",
    "_run_print_help (", "_run_command (", "Command.run (hexscrape/commands", "AsyncCrawlerProcess.",
    "CrawlerProcess.", "AsyncioSelectorReactor.run (", "BaseEventLoop.run_forever (",
    "BaseEventLoop._run_once (", "Handle._run (", "Thread._bootstrap (", "Thread._bootstrap_inner (",
    "Thread.run (", "_worker (concurrent/futures", "_WorkItem.run (",
)
"""The call trunk of every sample (runpy, the command, the reactor loop, thread bootstraps):
left out of the inclusive table."""


def parse_pyspy_raw(path: Path, top: int = 25, own: str = "hexscrape/") -> dict[str, Any]:
    """Hotspots of a ``py-spy record -f raw [--threads]`` file.

    *own*: path prefix of the project's code; ``own_code_inclusive_pct`` is the
    share of samples with any frame of it on the stack (its entry point
    ``hexscrape/commands`` excluded, as it is the trunk of everything).
    """
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    pkg_counts: dict[str, int] = {}
    thread_counts: dict[str, int] = {}
    thread_names: dict[str, str] = {}
    thread_label: dict[str, str] = {}
    total = startup = own_count = complete_count = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = stack.split(";")
            thread = "?"
            if frames and frames[0].startswith(("thread (", "process ")):
                while frames and frames[0].startswith(("thread (", "process ")):
                    if frames[0].startswith("thread ("):
                        thread, _, tname = frames[0].partition(": ")
                        if tname:
                            thread_label[thread] = tname
                    frames = frames[1:]
            if not frames:
                continue
            total += count
            if _is_startup(frames):
                startup += count
                continue
            thread_counts[thread] = thread_counts.get(thread, 0) + count
            if thread not in thread_names:
                thread_names[thread] = " > ".join(_split_frame(f)[0] for f in frames[:3])
            complete = frames[0].startswith(ROOTS)
            func, file = _split_frame(frames[-1])
            key = f"{func} ({file})"
            self_counts[key] = self_counts.get(key, 0) + count
            pkg = _package(file)
            pkg_counts[pkg] = pkg_counts.get(pkg, 0) + count
            if complete:
                complete_count += count
            if any(own in f and "hexscrape/commands" not in f for f in frames):
                own_count += count
            seen = set()
            for fr in frames:
                fn, fl = _split_frame(fr)
                k = f"{fn} ({fl})"
                if k not in seen and not k.startswith(TRUNK):
                    seen.add(k)
                    incl_counts[k] = incl_counts.get(k, 0) + count
    steady = total - startup

    def table(counts: dict[str, int], n: int) -> list[dict[str, Any]]:
        base = steady
        rows = sorted(counts.items(), key=lambda kv: -kv[1])
        return [{"name": k, "samples": v, "pct": round(100.0 * v / base, 1) if base else 0.0}
                for k, v in rows[:n]]

    threads = table(thread_counts, 8)
    for t in threads:
        key = t["name"]
        t["name"] = f"{thread_label.get(key, key)}: {thread_names.get(key, '')}"

    return {
        "tool": "py-spy",
        "samples": total,
        "startup_samples": startup,
        "startup_pct": round(100.0 * startup / total, 1) if total else 0.0,
        "complete_stacks_pct": round(100.0 * complete_count / steady, 1) if steady else 0.0,
        "own_code_inclusive_pct": round(100.0 * own_count / steady, 1) if steady else 0.0,
        "self": table(self_counts, top),
        "inclusive": table(incl_counts, top),
        "by_package": table(pkg_counts, 15),
        "by_thread": threads,
    }


def parse_cprofile(path: Path, top: int = 25) -> dict[str, Any]:
    import pstats

    st = pstats.Stats(str(path))
    stats = st.stats  # type: ignore[attr-defined]
    total_tt = sum(v[2] for v in stats.values()) or 1.0
    rows_self = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    rows_cum = sorted(stats.items(), key=lambda kv: -kv[1][3])[:top]

    def name(k: tuple[str, int, str]) -> str:
        file, line, func = k
        return f"{func} ({'/'.join(Path(file).parts[-2:])}:{line})"

    pkg: dict[str, float] = {}
    for k, v in stats.items():
        p = _package(k[0])
        pkg[p] = pkg.get(p, 0.0) + v[2]
    return {
        "tool": "cProfile",
        "total_s": round(total_tt, 2),
        "self": [{"name": name(k), "seconds": round(v[2], 3), "pct": round(100 * v[2] / total_tt, 1)}
                 for k, v in rows_self],
        "inclusive": [{"name": name(k), "seconds": round(v[3], 3), "pct": round(100 * v[3] / total_tt, 1)}
                      for k, v in rows_cum],
        "by_package": [{"name": k, "seconds": round(v, 3), "pct": round(100 * v / total_tt, 1)}
                       for k, v in sorted(pkg.items(), key=lambda kv: -kv[1])[:15]],
    }
