"""Hosts, URLs, ports and the one HTTP health probe, written once for every process.

A server *binds* to ``inference.host``; everybody else *connects* to the address that
reaches it from this machine (:func:`connect_host`): the wildcard ``0.0.0.0`` is reached
at ``127.0.0.1`` and ``::`` at ``::1`` (a socket bound to ``::`` always listens on IPv6,
on IPv4 only when the kernel maps it). URLs bracket IPv6 literals.

:func:`probe_http` is the single GET used by the supervisor's health loop, the trainer's
wait for its server (:func:`backend.rollout.wait_for_health`) and the dashboard's
process sampler. It never goes through a proxy: these are loopback (or cluster-internal)
addresses, and a shell's ``http_proxy`` must not swallow them.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def connect_host(host: str) -> str:
    """The address that reaches a server bound to ``host`` from this machine."""
    return _WILDCARDS.get(host.strip(), host.strip())


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: connectable, IPv6 in brackets."""
    h = connect_host(host)
    return f"[{h}]" if ":" in h else h


def http_url(host: str, port: int) -> str:
    """``http://host:port`` of a server bound to ``host`` (no trailing slash)."""
    return f"http://{url_host(host)}:{int(port)}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (a name is resolved)."""
    h = host.strip().strip("[]")
    if h in LOOPBACK_HOSTS:
        return True
    try:
        infos = socket.getaddrinfo(h, None)
    except OSError:
        return False
    return bool(infos) and all(str(i[4][0]).startswith("127.") or i[4][0] == "::1" for i in infos)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_error(host: str, port: int) -> OSError | None:
    """Why a TCP server could not bind ``host:port`` now (None: it could)."""
    h = "0.0.0.0" if host.strip() == "" else host.strip()
    with socket.socket(_family(h), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((h, port))
        except OSError as e:
            return e
    return None


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now."""
    return bind_error(host, port) is None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_owner(port: int) -> str | None:
    """``"python3 (pid 123): python3 -m http.server"`` for the process listening on ``port``."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                p = psutil.Process(c.pid)
                cmd = " ".join(p.cmdline())[:120]
                return f"{p.name()} (pid {c.pid})" + (f": {cmd}" if cmd else "")
            except psutil.Error:
                return f"pid {c.pid}"
    return None


# --------------------------------------------------------------------------- health probe

# No proxy for probes (see the module docstring); one opener for the whole process.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Probe:
    """One GET: did it answer 200, how fast, and what it said."""

    url: str
    status: int | None  # HTTP status; None when nothing answered
    latency_ms: float | None
    error: str | None = None  # why it is not ok ("HTTP 503: ...", "ConnectionRefusedError: ...")
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == 200

    def json(self) -> Any:
        """The body as JSON ({} when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return {}


def error_message(body: bytes) -> str:
    """What an HTTP error body says: an OpenAI-style ``error.message`` (or FastAPI's
    ``detail``), else the start of the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", errors="replace")
    err = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)[:500]


def probe_http(url: str, timeout_s: float = 2.0) -> Probe:
    """GET ``url`` once (no proxy, at most ``timeout_s``); never raises for network errors."""
    t0 = time.perf_counter()
    try:
        with contextlib.closing(_OPENER.open(url, timeout=timeout_s)) as resp:
            body = resp.read(_MAX_BODY)
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        body = e.read(_MAX_BODY) if e.fp is not None else b""
        e.close()
        return Probe(url, e.code, (time.perf_counter() - t0) * 1000.0, f"HTTP {e.code}: {error_message(body)}", body)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        return Probe(url, None, None, f"{type(reason).__name__}: {reason}")
    latency = (time.perf_counter() - t0) * 1000.0
    return Probe(url, status, latency, None if status == 200 else f"HTTP {status}: {error_message(body)}", body)
