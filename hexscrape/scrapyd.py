"""Run the cluster's workers as scrapyd jobs: the client and launcher side.

``python run_cluster.py --scrapyd URL[,URL...] --workers-per-node M`` runs the
same primary as the local mode (:mod:`hexscrape.cluster`), but each worker slot
is a scrapyd job instead of a child process. This module is the scrapyd half:
an HTTP client for one node (:class:`ScrapydNode`), the egg builder and
deployer, and a :class:`JobLauncher` that schedules, watches and cancels one
job per slot. It uses the standard library only (no Scrapy, no Twisted, no
requests), so the primary stays free of them.

Why each step:

* Slices are computed over *all* slots of all nodes (slot ``k`` runs on node
  ``k // M``), so no two jobs anywhere share a proxy session. A job's slice,
  slot, Redis URL and run id travel as job settings (``setting=NAME=VALUE``),
  which win over the node's environment (:mod:`hexscrape.config`).
* scrapyd 1.6 does not report a job's exit code. A job ended well when its last
  stats record (``<prefix>:stats``) is the ``final`` one with reason
  ``finished`` or ``shutdown``; otherwise it crashed and the slot is
  rescheduled. A job listed as *finished* by scrapyd is known dead, so its
  slice lease is released first; a job we merely lost sight of (its node stopped
  answering, or scrapyd forgot it) may still run: its lease must expire instead.
* ``cancel.json`` sends SIGINT, Scrapy's graceful shutdown (reason
  ``shutdown``): that is the drain. ``signal=KILL`` is the deadline.

Credentials. scrapyd records job settings: a pending job's settings are shown
by ``listjobs.json`` and every started job's full command line (``-s NAME=VALUE``
included) goes to scrapyd's log. So by default the launcher sends no proxy
configuration: ``HEX_USER``, ``HEX_PASS`` and ``HEX_GATEWAY`` come from the
scrapyd service's own environment, which scrapyd hands to every job (e.g. a
systemd unit with ``EnvironmentFile=/etc/hexscrape/proxy.env``, mode 0600).
``--scrapyd-pass-credentials`` sends the launcher's values as job settings
instead (never logged by us, but scrapyd keeps them). A Redis URL with a
password is a credential too: it is sent only with that option, otherwise the
nodes must have ``REDIS_URL`` (pointing at the same Redis) in their environment.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from base64 import b64encode
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("hexscrape.scrapyd")

DEFAULT_PROJECT = "hexscrape"
CONTROL_TIMEOUT = 10.0  # schedule, cancel, listprojects...
DEPLOY_TIMEOUT = 120.0  # addversion.json runs `scrapy list` on the node
POLL_TIMEOUT = 3.0  # listjobs.json, every poll interval: keep the loop responsive
LOG_TAIL_BYTES = 32768
CREDENTIAL_NAMES = ("HEX_GATEWAY", "HEX_USER", "HEX_PASS")


class ScrapydError(Exception):
    """A scrapyd node refused or could not be reached: one-line message."""


class NodeUnreachable(ScrapydError):
    """The node did not answer (connection refused, timeout, not scrapyd)."""


# -- node URLs ------------------------------------------------------------------


def parse_node_urls(values: Iterable[str]) -> list[str]:
    """``--scrapyd`` values (repeatable, comma-separated) as base URLs without a
    trailing slash (scrapyd-client would build ``//listprojects.json``);
    raise ValueError with a one-line message."""
    urls: list[str] = []
    for value in values:
        for raw in value.split(","):
            raw = raw.strip()
            if not raw:
                continue
            try:
                parts = urllib.parse.urlsplit(raw)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError as exc:
                raise ValueError(f"{display_url(raw)!r} is not a URL: {exc}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{display_url(raw)!r} is not an http(s)://host:port URL")
            if parts.query or parts.fragment:
                raise ValueError(f"{display_url(raw)!r} must not have a query or fragment")
            url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")))
            if url in urls:
                raise ValueError(f"{display_url(url)!r} is listed twice")
            urls.append(url)
    if not urls:
        raise ValueError("no scrapyd URL given")
    return urls


def display_url(url: str) -> str:
    """*url* without its userinfo (scrapyd basic-auth password), for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))
    except ValueError:
        return "<unparseable URL>"


def is_loopback_url(url: str) -> bool:
    """Whether *url*'s host is this machine (so it can reach our loopback services)."""
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return False
    return is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_password(url: str) -> str | None:
    try:
        pw = urllib.parse.urlsplit(url).password
    except ValueError:
        return None
    return urllib.parse.unquote(pw) if pw else None


def project_from_cfg(root: Path) -> str:
    """The ``[deploy] project`` of the checkout's scrapy.cfg (else ``hexscrape``)."""
    import configparser

    cp = configparser.ConfigParser()
    try:
        cp.read(root / "scrapy.cfg")
        return cp.get("deploy", "project", fallback=DEFAULT_PROJECT) or DEFAULT_PROJECT
    except configparser.Error:
        return DEFAULT_PROJECT


# -- one node -------------------------------------------------------------------


@dataclass(frozen=True)
class JobList:
    """One ``listjobs.json`` answer, reduced to what the launcher needs."""

    pending: frozenset[str]
    running: dict[str, int | None]  # job id -> pid
    finished: dict[str, str | None]  # job id -> log URL path


class ScrapydNode:
    """The scrapyd JSON API of one node (urllib; basic auth from the URL)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.name = display_url(url)
        self.auth: str | None = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            pw = urllib.parse.unquote(parts.password or "")
            self.auth = "Basic " + b64encode(f"{user}:{pw}".encode()).decode()
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            parts = parts._replace(netloc=host)
        self.base = urllib.parse.urlunsplit(parts).rstrip("/")

    def __repr__(self) -> str:
        return f"ScrapydNode({self.name!r})"

    # -- transport ---------------------------------------------------------------

    def _open(self, path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = CONTROL_TIMEOUT, method: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.base + path, data=data, headers=dict(headers or {}),
                                     method=method)
        if self.auth:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if method == "HEAD":
                    return resp.status, (resp.headers.get("Content-Length") or "").encode()
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                raise ScrapydError(f"scrapyd node {self.name}: authentication failed "
                                   "(user:password@ in the URL)") from None
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NodeUnreachable(f"scrapyd node {self.name} is unreachable: {reason}") from None

    def _call(self, endpoint: str, *, get: dict[str, str] | None = None,
              post: Sequence[tuple[str, str]] | None = None,
              files: dict[str, bytes] | None = None, timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
        path = "/" + endpoint
        if get:
            path += "?" + urllib.parse.urlencode(get)
        data = None
        headers: dict[str, str] = {}
        if files is not None:
            data, ctype = _multipart(post or (), files)
            headers["Content-Type"] = ctype
        elif post is not None:
            data = urllib.parse.urlencode(list(post)).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        status, body = self._open(path, data=data, headers=headers, timeout=timeout)
        try:
            answer = json.loads(body)
        except ValueError:
            raise NodeUnreachable(
                f"scrapyd node {self.name}: {endpoint} answered HTTP {status} without JSON "
                "(is this a scrapyd URL?)"
            ) from None
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            message = answer.get("message") if isinstance(answer, dict) else None
            text = " ".join(str(message or f"HTTP {status}").split())[:300]
            raise ScrapydError(f"scrapyd node {self.name}: {endpoint}: {text}")
        return answer

    # -- API -----------------------------------------------------------------------

    def daemon_status(self) -> dict[str, Any]:
        return self._call("daemonstatus.json", timeout=POLL_TIMEOUT)

    def projects(self) -> list[str]:
        return list(self._call("listprojects.json")["projects"])

    def versions(self, project: str) -> list[str]:
        return list(self._call("listversions.json", get={"project": project})["versions"])

    def spiders(self, project: str, version: str | None = None) -> list[str]:
        query = {"project": project}
        if version:
            query["_version"] = version
        return list(self._call("listspiders.json", get=query, timeout=DEPLOY_TIMEOUT)["spiders"])

    def add_version(self, project: str, version: str, egg: bytes) -> dict[str, Any]:
        return self._call("addversion.json", post=[("project", project), ("version", version)],
                          files={"egg": egg}, timeout=DEPLOY_TIMEOUT)

    def schedule(self, project: str, spider: str, jobid: str,
                 settings: Sequence[tuple[str, str]], version: str | None = None) -> str:
        """Queue a job; *settings* are never logged here (they may hold credentials)."""
        form = [("project", project), ("spider", spider), ("jobid", jobid)]
        if version:
            form.append(("_version", version))
        form += [("setting", f"{name}={value}") for name, value in settings]
        return str(self._call("schedule.json", post=form)["jobid"])

    def cancel(self, project: str, job: str, signal: str | None = None) -> str | None:
        """Cancel a job: SIGINT by default (Scrapy drains); returns the state it had."""
        form = [("project", project), ("job", job)]
        if signal:
            form.append(("signal", signal))
        return self._call("cancel.json", post=form).get("prevstate")

    def jobs(self, project: str) -> JobList:
        answer = self._call("listjobs.json", get={"project": project}, timeout=POLL_TIMEOUT)
        return JobList(
            pending=frozenset(str(j["id"]) for j in answer.get("pending", [])),
            running={str(j["id"]): j.get("pid") for j in answer.get("running", [])},
            finished={str(j["id"]): j.get("log_url") for j in answer.get("finished", [])},
        )

    def log_tail(self, path: str, nbytes: int = LOG_TAIL_BYTES) -> str | None:
        """The end of a job log (``log_url`` path), or None if the node has none.

        Asks for the size first: Twisted mishandles a suffix range (``bytes=-N``)
        longer than the file."""
        try:
            status, length = self._open(path, method="HEAD", timeout=POLL_TIMEOUT)
            if status != 200:
                return None
            size = int(length or 0)
            headers = {"Range": f"bytes={size - nbytes}-"} if size > nbytes else {}
            status, body = self._open(path, headers=headers, timeout=POLL_TIMEOUT)
        except (ScrapydError, ValueError):
            return None
        if status not in (200, 206):
            return None
        return body[-nbytes:].decode("utf-8", "replace")


def _multipart(fields: Iterable[tuple[str, str]], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out: list[bytes] = []
    for name, value in fields:
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode(),
                value.encode(), b"\r\n"]
    for name, content in files.items():
        out += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{name}.egg\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                content, b"\r\n"]
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# -- the egg --------------------------------------------------------------------

_EGG_FILES = ("scrapy.cfg", "setup.py", "pyproject.toml", "README.md")


def build_egg(root: Path, package: str = "hexscrape") -> bytes:
    """The project egg, built by ``scrapyd-deploy --build-egg`` from a copy of
    the checkout (setuptools writes build/ and egg-info next to setup.py: a
    copy keeps the working tree, and concurrent launchers, out of each other's way)."""
    with tempfile.TemporaryDirectory(prefix="hexscrape-egg-") as tmp:
        work = Path(tmp) / "src"
        work.mkdir()
        for name in _EGG_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, work / name)
        shutil.copytree(root / package, work / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        egg = Path(tmp) / "project.egg"
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "scrapyd_client.deploy", "--build-egg", str(egg)],
                cwd=work, capture_output=True, text=True, timeout=300, check=False,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ScrapydError("building the project egg timed out") from None
        if proc.returncode != 0 or not egg.is_file():
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit {proc.returncode}"
            if "No module named scrapyd_client" in why:
                why = "scrapyd-client is not installed (pip install 'hexscrape[scrapyd]')"
            raise ScrapydError(f"building the project egg failed: {why}")
        return egg.read_bytes()


# -- jobs -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobEnd:
    """How a job left our sight.

    ``how``: ``finished`` (scrapyd lists it as finished), ``removed`` (cancelled
    while still pending: it never ran), ``vanished`` (no longer listed at all,
    e.g. scrapyd restarted) or ``lost`` (its node stopped answering).
    """

    how: str
    dead: bool  # the process is known to be gone


@dataclass(eq=False)
class ScrapydJob:
    """One scheduled job as last seen by the launcher's poll."""

    launcher: JobLauncher
    node: NodeState
    id: str
    slot: int
    pid: int | None = None
    started: bool = False
    log_url: str | None = None
    end: JobEnd | None = None
    cancel_wanted: str | None = None  # "INT" or "KILL", until scrapyd confirmed it
    kill_sent: bool = False
    removed: bool = False  # cancel.json said it was still pending

    @property
    def node_name(self) -> str:
        return self.node.node.name

    def stop(self) -> None:
        """Graceful: scrapyd's cancel sends SIGINT, Scrapy drains."""
        self.launcher.cancel(self, None)

    def kill(self) -> None:
        self.kill_sent = True
        self.launcher.cancel(self, "KILL")

    def log_tail(self) -> str | None:
        return self.node.node.log_tail(self.log_url) if self.log_url else None


@dataclass(eq=False)
class NodeState:
    """A node and the jobs of this run on it."""

    node: ScrapydNode
    index: int
    version: str | None = None
    jobs: dict[str, ScrapydJob] = field(default_factory=dict)
    next_poll: float = 0.0
    down_since: float | None = None
    last_error: str | None = None


class JobLauncher:
    """Schedule, watch (``listjobs.json``) and cancel one project's jobs on nodes.

    ``refresh`` polls each node with live jobs at most every *poll_interval*
    seconds; jobs report what the last poll saw. A node that does not answer for
    *node_timeout* seconds has its jobs declared ``lost`` (not known dead).
    """

    def __init__(
        self,
        urls: Sequence[str],
        project: str,
        spider: str,
        *,
        poll_interval: float = 0.5,
        node_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = [NodeState(ScrapydNode(u), i) for i, u in enumerate(urls)]
        self.project = project
        self.spider = spider
        self.poll_interval = poll_interval
        self.node_timeout = node_timeout
        self.clock = clock

    # -- preparation -------------------------------------------------------------

    def prepare(self, *, deploy: bool, egg: Callable[[], bytes]) -> None:
        """Check every node answers, deploy the egg where the project is missing
        (everywhere with *deploy*), check the spider is there; raise ScrapydError."""
        missing: list[NodeState] = []
        for st in self.nodes:
            st.node.daemon_status()
            if deploy or self.project not in st.node.projects():
                missing.append(st)
        if missing:
            data = egg()
            version = str(int(time.time()))
            for st in missing:
                try:
                    answer = st.node.add_version(self.project, version, data)
                except ScrapydError as exc:
                    hint = (" (scrapyd 1.6 needs setuptools<81 on the node: pip install "
                            "'hexscrape[scrapyd]')" if "pkg_resources" in str(exc) else "")
                    raise ScrapydError(f"deploying project {self.project!r}: {exc}{hint}") from None
                st.version = version
                logger.info("scrapyd node %s: deployed project %s version %s (%s spider(s))",
                            st.node.name, self.project, version, answer.get("spiders", "?"))
        for st in self.nodes:
            if st.version is None:
                versions = st.node.versions(self.project)
                st.version = versions[-1] if versions else None
            spiders = st.node.spiders(self.project, st.version)
            if self.spider not in spiders:
                raise ScrapydError(
                    f"scrapyd node {st.node.name}: project {self.project!r} version "
                    f"{st.version} has no spider {self.spider!r} (use --deploy to upload this "
                    "checkout)"
                )

    # -- jobs --------------------------------------------------------------------

    def schedule(self, slot: int, preferred: int, jobid: str,
                 settings: Sequence[tuple[str, str]]) -> ScrapydJob:
        """Queue *jobid* on node *preferred*, else on the first other node that
        answers (a slice is valid on any node); raise ScrapydError."""
        order = [self.nodes[preferred]] + [n for n in self.nodes if n.index != preferred]
        order.sort(key=lambda n: n.down_since is not None)  # stable: preferred first if up
        errors: list[str] = []
        for st in order:
            try:
                st.node.schedule(self.project, self.spider, jobid, settings, st.version)
            except ScrapydError as exc:
                if isinstance(exc, NodeUnreachable) and st.down_since is None:
                    st.down_since = self.clock()
                errors.append(str(exc))
                continue
            job = ScrapydJob(self, st, jobid, slot)
            st.jobs[jobid] = job
            st.next_poll = 0.0
            return job
        raise ScrapydError("; ".join(errors) or "no scrapyd node")

    def cancel(self, job: ScrapydJob, signal: str | None) -> None:
        """Ask the job's node to cancel it; retried by ``refresh`` if that fails."""
        if job.end is not None:
            return
        job.cancel_wanted = signal or "INT"
        self._send_cancel(job)

    def _send_cancel(self, job: ScrapydJob) -> None:
        signal = None if job.cancel_wanted == "INT" else job.cancel_wanted
        try:
            prev = job.node.node.cancel(self.project, job.id, signal)
        except ScrapydError as exc:
            logger.warning("cannot cancel job %s on %s yet: %s", job.id, job.node_name, exc)
            return
        job.cancel_wanted = None
        if prev == "pending":
            job.removed = True
        job.node.next_poll = 0.0

    def refresh(self) -> None:
        """Poll the nodes that are due and have live jobs of ours."""
        now = self.clock()
        for st in self.nodes:
            live = [j for j in st.jobs.values() if j.end is None]
            if not live or now < st.next_poll:
                continue
            st.next_poll = now + self.poll_interval
            try:
                listing = st.node.jobs(self.project)
            except ScrapydError as exc:
                self._node_trouble(st, live, now, str(exc))
                continue
            if st.down_since is not None:
                logger.info("scrapyd node %s answers again", st.node.name)
            st.down_since = None
            st.last_error = None
            for job in live:
                self._update(job, listing)
                if job.end is None and job.cancel_wanted:
                    self._send_cancel(job)

    def _update(self, job: ScrapydJob, listing: JobList) -> None:
        if job.id in listing.running:
            job.started = True
            job.pid = listing.running[job.id] or job.pid
        elif job.id in listing.finished:
            job.log_url = listing.finished[job.id] or job.log_url
            job.end = JobEnd("finished", dead=True)
        elif job.id in listing.pending:
            pass
        elif job.removed and not job.started:
            job.end = JobEnd("removed", dead=True)
        else:
            job.end = JobEnd("vanished", dead=False)
        if job.log_url is None:
            job.log_url = f"/logs/{self.project}/{self.spider}/{job.id}.log"

    def _node_trouble(self, st: NodeState, live: list[ScrapydJob], now: float, why: str) -> None:
        if st.down_since is None:
            st.down_since = now
            logger.warning("%s; its %d job(s) are kept for %.0fs", why, len(live),
                           self.node_timeout)
        st.last_error = why
        if now - st.down_since >= self.node_timeout:
            for job in live:
                job.end = JobEnd("lost", dead=False)

    def live_jobs(self) -> list[ScrapydJob]:
        return [j for st in self.nodes for j in st.jobs.values() if j.end is None]
