"""Prometheus metrics and the health check: what an operator's systems ask a server.

Off unless ``metrics.listen`` (or ``health.listen``) is set; off, nothing here is
imported or called on any path. On, the hot path pays only this:

* ``sshspec_codes_total{code}``: the `Emitter` adds 1 to a plain ``dict`` entry
  per code of a step, where it already looks the step's records up;
* the histograms are observed once per authentication check, program start and
  webhook call: a ``bisect`` and three additions.

Counts are plain Python numbers, not ``prometheus_client``'s ``Counter`` and
``Histogram`` objects: those take a lock and several calls per increment, which
cost a benchmark connection ~91k instructions (11 codes, 2 observations, counted
by bench/metrics_instructions.py with label children resolved once and cached),
~2.3% of its CPU. Everything runs in the server's one event loop, scrapes
included, so nothing needs a lock; `prometheus_client` builds the families and
encodes the text format at scrape time.

What is live is read at scrape time instead of being kept up to date on every
transition: ``sshspec_machines{machine,state}`` walks the live connections and
their sessions, and ``sshspec_{received,sent}_bytes_total`` add up the kernel's
own TCP counters (``TCP_INFO``'s ``tcpi_bytes_received`` / ``tcpi_bytes_acked``,
Linux >= 4.2) of the live connections' sockets and of the ones that ended (read
once, as each ends). These are bytes on the wire, SSH framing and encryption
included; ``acked`` counts what the client acknowledged.

Both endpoints are served by aiohttp in the server's own loop:
``GET {metrics.path}`` (Prometheus' text format, ``prometheus_client``'s own
encoder) and ``GET /healthz``: 200 ``ok`` while the server machine is
``available``, 503 ``not ok (<state>)`` while it starts, drains or failed.
"""

from __future__ import annotations

import bisect
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sshspec.codes import CATALOG
from sshspec.fsm import core

if TYPE_CHECKING:
    from sshspec.adapters.server import Server

# Authentication checks and webhook calls: from a hash compare to a slow webhook's timeout.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, both u64, at 120.
_TCP_BYTES = struct.Struct("=120xQQ")


def tcp_bytes(sock: Any) -> tuple[int, int]:
    """(bytes received, bytes sent and acknowledged) of a TCP socket; (0, 0) when the
    kernel cannot say (not Linux, too old, the socket is gone)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_BYTES.size)
    except (OSError, AttributeError):
        return 0, 0
    if len(info) < _TCP_BYTES.size:
        return 0, 0
    acked, received = _TCP_BYTES.unpack(info)
    return received, acked


class Histogram:
    """A histogram by label values, as plain numbers (one event loop writes and reads it)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.series: dict[tuple[str, ...], list[Any]] = {}  # labels -> [bucket counts, sum]

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        series[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series[1] += seconds

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for labels, (counts, total) in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(labels), buckets, total)
        return family


class Metrics:
    """One server process's metrics, in a registry of its own."""

    def __init__(self, machines: core.Machines) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.machines = machines
        # Every code from the start: a rate over a code that never happened is 0, not absent.
        self.codes: dict[str, int] = dict.fromkeys(CATALOG, 0)
        self.auth = Histogram("sshspec_auth_duration_seconds", "How long the handler took to check "
                              "credentials, by method and verdict", ("method", "result"))
        self.session_start = Histogram("sshspec_session_start_duration_seconds", "From a shell, exec or "
                                       "subsystem request to its program running", ("kind",))
        self.webhook = Histogram("sshspec_webhook_duration_seconds", "One webhook HTTP call, by endpoint "
                                 "(password, pubkey, config) and result", ("webhook", "result"))
        self.closed_bytes = [0, 0]  # received, sent: of the connections that ended
        self.server: Server | None = None
        self.registry.register(_Collector(self))

    def observe_auth(self, method: str, verdict: object, seconds: float) -> None:
        result = verdict if isinstance(verdict, str) and verdict in core.AUTH_VERDICTS else "error"
        self.auth.observe((method, result), seconds)

    def observe_session_start(self, kind: str, seconds: float) -> None:
        self.session_start.observe((kind,), seconds)

    def observe_webhook(self, webhook: str, result: str, seconds: float) -> None:
        self.webhook.observe((webhook, result), seconds)

    def connection_ended(self, sock: Any) -> None:
        received, sent = tcp_bytes(sock)
        self.closed_bytes[0] += received
        self.closed_bytes[1] += sent

    def watch(self, server: Server) -> None:
        """Read the live machines and sockets of `server` at every scrape."""
        self.server = server

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """Everything, built at scrape time from the plain numbers and the live server."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()  # collected at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        metrics, server = self.metrics, self.metrics.server
        codes = CounterMetricFamily("sshspec_codes", "Message codes emitted (a log record each, whatever "
                                    "the log level), by code", labels=["code"])
        for code, count in metrics.codes.items():
            codes.add_metric([code], count)
        yield codes
        yield metrics.auth.family()
        yield metrics.session_start.family()
        yield metrics.webhook.family()
        counts = {(m.name, state): 0 for m in (metrics.machines.server, metrics.machines.connection,
                                               metrics.machines.session)
                  for state in m.loaded.spec.states}
        received, sent = metrics.closed_bytes
        if server is not None:
            counts[("server", server.core.state)] += 1
            for conn in list(server.connections):
                counts[("connection", conn.core.state)] += 1
                for session in list(conn.core.sessions.values()):
                    counts[("session", session.state)] += 1
                r, s = tcp_bytes(conn.sock)
                received += r
                sent += s
        machines = GaugeMetricFamily("sshspec_machines", "Live instances of each spec's machine, by state",
                                     labels=["machine", "state"])
        for (machine, state), count in counts.items():
            machines.add_metric([machine, state], count)
        yield machines
        yield CounterMetricFamily("sshspec_received_bytes", "Bytes received from SSH clients (TCP payload, "
                                  "from the kernel's counters)", value=received)
        yield CounterMetricFamily("sshspec_sent_bytes", "Bytes sent to SSH clients and acknowledged by them "
                                  "(TCP payload, from the kernel's counters)", value=sent)


# --- the HTTP endpoints -------------------------------------------------------------------


async def start_endpoints(server: Server) -> list[Any]:
    """Bind `metrics.listen` and `health.listen` (one listener when they are the same
    address); returns the aiohttp runners to clean up. Raises OSError when a bind fails."""
    from aiohttp import web

    config = server.config
    routes: dict[tuple[str, int], list[web.RouteDef]] = {}
    if config.metrics.listen is not None and server.metrics is not None:
        metrics = server.metrics

        async def scrape(request: web.Request) -> web.Response:
            response = web.Response(body=metrics.exposition())
            response.headers["Content-Type"] = CONTENT_TYPE_LATEST
            return response
        where = config.metrics.listen
        routes.setdefault((where.host, where.port), []).append(web.get(config.metrics.path, scrape))
    if config.health.listen is not None:

        async def health(request: web.Request) -> web.Response:
            state = server.core.state
            if state == "available":
                return web.Response(text="ok\n")
            return web.Response(status=503, text=f"not ok ({state})\n")
        where = config.health.listen
        routes.setdefault((where.host, where.port), []).append(web.get("/healthz", health))
    runners: list[web.AppRunner] = []
    try:
        for (host, port), defs in routes.items():
            app = web.Application()
            app.add_routes(defs)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return runners


def bound_addresses(runners: list[Any]) -> list[tuple[str, int]]:
    """Where the endpoints listen (port 0 picks one)."""
    out = []
    for runner in runners:
        for address in runner.addresses:
            out.append((address[0], address[1]))
    return out
