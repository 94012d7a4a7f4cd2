"""Prometheus metrics: counted on the hot path as plain ints, turned into metrics at scrape.

A lookup bumps list and dict entries (counters.py); a scrape reads them
and the tables' state through a custom Collector (prometheus_client's
"custom collectors"), so no prometheus_client object is touched per lookup.
Served on its own listener by gevent.pywsgi and make_wsgi_app, on the server's
event loop: no thread. Every client is untrusted: each request must arrive, and its
reply be sent, within REQUEST_TIMEOUT, and of SCRAPERS connections at once the one
waiting longest for its request (idle, slowloris) makes room for a newcomer
(_Slots), so no number of them blocks a scrape; a bad request gets a 400 and
one rate-limited warning that names the client, never a traceback. Coded against
prometheus_client 0.16 (Debian 12; 0.21 in Debian 13). Names follow https://prometheus.io/docs/practices/naming/.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .config import Address
from .counters import LATENCY_SAMPLE, CheckStats, Latency, ServerStats
from .listeners import format_address
from .logtext import printable
from .responder import Responder, SocketmapResponder

if TYPE_CHECKING:
    from .maps import Maps

log = logging.getLogger(__name__)

# Connections served at once. One Prometheus scrapes over one connection at a
# time: a few servers, an admin's curl, and room. A newcomer beyond them takes the
# slot of the connection that has waited longest for its request (_Slots).
SCRAPERS = 16
# Seconds for a whole request to arrive (from the connection, or from the last
# reply on a kept-alive one) and for its reply to be sent. A scrape on loopback
# takes milliseconds; Prometheus reconnects for the next scrape if this closed
# its idle connection (its scrape_interval is 15 s or more).
REQUEST_TIMEOUT = 5.0
# How much of a waiting request is looked at for its end (pywsgi reads a request
# line of up to 8 KiB, and headers after it).
_PEEK = 65536
# How much of a bad request a warning quotes.
_QUOTED = 100

# Server.warn_peer: (the client's socket, its address, what is wrong) -> logged or
# counted, within the per-client warning budget (ratelimit.py).
Warn = Callable[[Any, object, str], None]


class TcpmapCollector(Collector):
    """Everything, read at scrape time."""

    def __init__(
        self,
        *,
        responders: list[Responder | SocketmapResponder],
        latency: Latency,
        checks: CheckStats,
        server: ServerStats,
        open_connections: Callable[[], int],
        maps: Maps,
    ) -> None:
        self._responders = responders
        self._latency = latency
        self._checks = checks
        self._server = server
        self._open = open_connections
        self._maps = maps

    def collect(self) -> Iterator[Any]:
        yield from self._lookup_metrics()
        yield from self._connection_metrics()
        yield from self._table_metrics()

    def _lookup_counts(self) -> dict[tuple[str, str, str], int]:
        """(map, protocol, result) -> lookups, summed over the listeners."""
        counts: dict[tuple[str, str, str], int] = {}

        def add(key: tuple[str, str, str], count: int) -> None:
            counts[key] = counts.get(key, 0) + count

        for responder in self._responders:
            if isinstance(responder, SocketmapResponder):
                for result in ("found", "notfound", "temporary"):
                    for name, count in getattr(responder, result).items():
                        add((name, "socketmap", result), count)
                add(("", "socketmap", "permanent"), responder.permanent)
            else:
                name = responder.map_name
                for result in ("found", "notfound", "temporary"):
                    add((name, "tcp_table", result), getattr(responder, result))
        return counts

    def _lookup_metrics(self) -> Iterator[Any]:
        lookups = CounterMetricFamily(
            "tcpmap_lookups",
            "Lookups answered, by map, protocol and result (permanent: unknown map or bad "
            "request, map left empty).",
            labels=("map", "protocol", "result"),
        )
        for labels, count in sorted(self._lookup_counts().items()):
            lookups.add_metric(labels, count)
        yield lookups
        histogram = HistogramMetricFamily(
            "tcpmap_lookup_duration_seconds",
            f"From a request read to its reply sent, inside the server; a sample: one read in "
            f"{LATENCY_SAMPLE} is timed (requests pipelined in one read share its time).",
            labels=(),
        )
        buckets = [
            ("+Inf" if bound == float("inf") else repr(bound), count)
            for bound, count in self._latency.cumulative()
        ]
        histogram.add_metric((), buckets, self._latency.sum)
        yield histogram

    def _connection_metrics(self) -> Iterator[Any]:
        server = self._server
        yield GaugeMetricFamily(
            "tcpmap_connections_open", "Client connections open now.", value=self._open()
        )
        yield CounterMetricFamily(
            "tcpmap_connections_accepted", "Client connections accepted.", value=server.accepted
        )
        closed = CounterMetricFamily(
            "tcpmap_connections_closed", "Client connections closed, by reason.", labels=("reason",)
        )
        for reason, count in server.closed.items():
            closed.add_metric((reason,), count)
        yield closed
        yield CounterMetricFamily(
            "tcpmap_reloads", "Reloads asked for with SIGHUP.", value=server.reloads
        )
        yield CounterMetricFamily(
            "tcpmap_warnings_suppressed",
            "Warnings not logged by the per-client rate limit.",
            value=server.warnings_suppressed,
        )

    def _table_metrics(self) -> Iterator[Any]:
        labels = ("map",)
        records = GaugeMetricFamily("tcpmap_table_records", "Records in the table.", labels=labels)
        size = GaugeMetricFamily("tcpmap_table_size_bytes", "Table file size.", labels=labels)
        built = GaugeMetricFamily(
            "tcpmap_table_built_timestamp_seconds",
            "When tcpmap-build built the table (its build record).",
            labels=labels,
        )
        published = GaugeMetricFamily(
            "tcpmap_table_published_timestamp_seconds",
            "When the file served was put in place (its ctime: the rename that published it).",
            labels=labels,
        )
        available = GaugeMetricFamily(
            "tcpmap_table_up", "1 if the table can answer, 0 if not.", labels=labels
        )
        info = GaugeMetricFamily(
            "tcpmap_table_info",
            "The file each map is served from (always 1).",
            labels=("map", "path"),
        )
        for name, live in self._maps:
            table = live.table
            available.add_metric((name,), 0 if table is None else 1)
            info.add_metric((name, str(live.path)), 1)
            if table is None:
                continue
            records.add_metric((name,), table.records)
            size.add_metric((name,), table.signature.size)
            published.add_metric((name,), table.signature.ctime_ns / 1e9)
            if table.info is not None:
                built.add_metric((name,), _timestamp(table.info.built_at))
        yield from (available, info, records, size, built, published)
        checks = self._checks
        run = CounterMetricFamily(
            "tcpmap_table_checks", "Checks of newly published files.", labels=labels
        )
        failed = CounterMetricFamily(
            "tcpmap_table_check_failures", "Checks that found a file bad.", labels=labels
        )
        last = GaugeMetricFamily(
            "tcpmap_table_last_check_duration_seconds",
            "How long the last check of the map took.",
            labels=labels,
        )
        for name in sorted(checks.run):
            run.add_metric((name,), checks.run[name])
            failed.add_metric((name,), checks.failed.get(name, 0))
            last.add_metric((name,), checks.last_seconds[name])
        yield from (run, failed, last)


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return float("nan")


def registry(collector: TcpmapCollector) -> CollectorRegistry:
    """Our metrics, and the process's (CPU, memory, file descriptors) and Python's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def wsgi_server(sock: Any, registry: CollectorRegistry, warn: Warn) -> _MetricsServer:
    """GET /metrics on SOCK (a listening gevent socket), on the running hub.

    WARN reports clients that send what is not a request for this listener.
    """
    app = make_wsgi_app(registry)

    def only_metrics(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        return app(environ, start_response)

    slots = _Slots(SCRAPERS)
    server = _MetricsServer(
        sock,
        only_metrics,
        spawn=slots.admit,
        log=None,  # no access log
        error_log=None,  # errors go through _ScrapeHandler, as warnings
        handler_class=_ScrapeHandler,
        # pywsgi would look the name up (getfqdn: a blocking reverse DNS query) at start.
        environ={"SERVER_NAME": format_address(sock.getsockname()).rpartition(":")[0]},
    )
    server.warn = warn
    server.slots = slots
    return server


class _Slots:
    """The metrics listener's connections: at most LIMIT, and newcomers always get one.

    When all are taken, a newcomer takes the slot of the connection that has waited
    longest for a whole request (idle, or trickling one: slowloris), as the map
    listeners do at --max-connections; a connection whose request has arrived is never
    chosen. If none is waiting (all are sending replies, each within REQUEST_TIMEOUT),
    the newcomer is closed. So N hostile connections cannot make a scrape wait:
    without this, each round of LIMIT of them held it REQUEST_TIMEOUT longer.
    Runs in the hub (BaseServer calls it from its accept watcher): nothing here blocks.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: set[Any] = set()  # the connections' greenlets
        # Connections waiting for a whole request: greenlet -> (since, socket).
        self.waiting: dict[Any, tuple[float, Any]] = {}

    def admit(self, run: Callable[..., object], /, *args: Any, **kwargs: Any) -> Any:
        """gevent's spawn(), as BaseServer.do_handle calls it: RUN(*ARGS) in a greenlet.

        None when the newcomer was closed: no slot could be freed.
        """
        if len(self.open) >= self.limit and not self._evict():
            _handle, close, conn = args
            close(*conn)
            return None
        greenlet = gevent.spawn(run, *args, **kwargs)
        self.open.add(greenlet)
        # Waiting for its request from now: the hub may accept more before it runs.
        self.waiting[greenlet] = (time.monotonic(), args[2][0])
        greenlet.rawlink(self._ended)
        return greenlet

    def _ended(self, greenlet: Any) -> None:
        self.open.discard(greenlet)
        self.waiting.pop(greenlet, None)

    def _evict(self) -> bool:
        for greenlet, (_, sock) in sorted(self.waiting.items(), key=lambda item: item[1][0]):
            if _has_request(sock):
                continue  # its request has arrived; the hub has yet to run its greenlet
            del self.waiting[greenlet]
            running = bool(greenlet)
            greenlet.kill(block=False)  # running: GreenletExit, and pywsgi closes its socket
            if not running:  # it never will run: nothing else closes its socket
                sock.close()
            return True
        return False


def _has_request(sock: Any) -> bool:
    """Whether a whole request head (up to its blank line) waits unread in SOCK's buffer.

    Peeked, without waiting (we are the hub). Part of one does not count: that is
    how a slowloris client looks. pywsgi reads what it can, so a connection whose
    handler is already reading one has nothing here until its client sends more.
    """
    try:
        peek = socket.socket(fileno=sock.fileno())
    except OSError:
        return False
    try:
        data = peek.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return b"\n\r\n" in data or b"\n\n" in data
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error to read: let its greenlet find it
    finally:
        peek.detach()


class _MetricsServer(WSGIServer):
    warn: Warn
    slots: _Slots


def _response(status: str, text: str) -> bytes:
    body = text.encode()
    head = (
        f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_BAD_REQUEST = _response("400 Bad Request", "this listener answers GET /metrics only\n")


class _ScrapeHandler(WSGIHandler):  # type: ignore[misc,unused-ignore]
    """pywsgi's connection handler with a deadline per request, and its error reports
    turned into rate-limited warnings (pywsgi prints them, with its socket's repr or a
    traceback, on stderr).

    Overrides pywsgi's handle_one_request, handle_error, log_error and
    _handle_client_error, the same in gevent 22.10 (Debian 12) to 24.11 (Debian 13) and later.
    """

    server: _MetricsServer
    _warned = False  # this request has been warned about

    def handle(self) -> None:
        sock = self.socket  # pywsgi drops it when the connection ends
        try:
            super().handle()
        except OSError as exc:  # the client reset the connection while told why not
            log.debug("%s: metrics listener: %s", format_address(self.client_address), exc)
        except Exception as exc:  # a client must never reach the hub's traceback
            message = printable(f"metrics listener: internal error: {type(exc).__name__}: {exc}")
            self.server.warn(sock, self.client_address, message)
            log.debug("metrics listener", exc_info=True)

    def handle_one_request(self) -> Any:
        # pywsgi answers requests already read without a switch: 2,000 pipelined
        # GETs held every lookup for 1.4 s. One request, then the others' turn.
        gevent.sleep(0)
        self._warned = False
        waiting = self.server.slots.waiting
        current = gevent.getcurrent()
        # Until read_request is done; the first request waits since the accept (_Slots.admit).
        waiting.setdefault(current, (time.monotonic(), self.socket))
        deadline = gevent.Timeout(REQUEST_TIMEOUT)
        deadline.start()
        try:
            result = super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            self._timed_out()
            return None
        finally:
            deadline.close()
            waiting.pop(current, None)
        if isinstance(result, tuple) and not self._warned:  # an error pywsgi did not report
            status = result[0]
            self._warn(
                "request line over 8 KiB, answered 414"
                if status == "414"
                else f"bad request, answered {status}"
            )
        return result

    def read_request(self, raw_requestline: str) -> Any:
        """pywsgi's: the request line and headers are in; the connection is busy now.

        Raises ValueError (pywsgi answers 400 through _handle_client_error) for a
        request that announces a body: /metrics takes none, and pywsgi would keep
        the slot waiting for the body after the reply, up to REQUEST_TIMEOUT.
        """
        result = super().read_request(raw_requestline)
        self.server.slots.waiting.pop(gevent.getcurrent(), None)
        if result and (self.content_length or self.headers.get("Transfer-Encoding")):
            self.close_connection = True
            raise ValueError("a request with a body: this listener answers GET /metrics only")
        return result

    def _timed_out(self) -> None:
        # An idle kept-alive connection ends so too: only debug.
        peer = format_address(self.client_address)
        log.debug("%s: metrics listener: no whole request in %ss, closing", peer, REQUEST_TIMEOUT)

    def handle_error(self, t: type[BaseException] | None, v: BaseException | None, tb: Any) -> None:
        """An error inside a response: the deadline, or a fault of ours (500)."""
        if isinstance(v, gevent.Timeout):  # the client stopped reading its reply
            self._timed_out()
            self.close_connection = True
            return
        self._warn(f"internal error: {type(v).__name__}: {v}")
        log.debug("metrics listener", exc_info=(t, v, tb))  # type: ignore[arg-type,unused-ignore]
        self._send_error_response_if_possible(500)  # type: ignore[attr-defined,unused-ignore]

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        """A request pywsgi cannot parse: 400 and a warning, never a traceback."""
        self.server.warn(
            self.socket,
            self.client_address,
            f"metrics listener: not a request for this listener, answered 400: {_what(self, ex)}",
        )
        self._warned = True
        return ("400", _BAD_REQUEST)

    def log_error(self, msg: str, *args: object) -> None:
        """Anything else pywsgi reports: a warning, without its socket's repr."""
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = f"{msg} {args}"
        self._warn(message)

    def _warn(self, message: str) -> None:
        """MESSAGE (printable already, or made so here) about this client."""
        self._warned = True
        text = printable(message)
        if len(text) > 3 * _QUOTED:
            text = text[: 3 * _QUOTED] + "..."
        self.server.warn(self.socket, self.client_address, f"metrics listener: {text}")


def _what(handler: WSGIHandler, ex: Exception) -> str:
    """What was wrong with a bad request (pywsgi's reason, without its quote of the
    request), the request line as sent, and a hint for the usual mistakes."""
    line = getattr(handler, "requestline", "") or ""
    if line.startswith("\x16\x03"):
        return "TLS: scrape http://, not https://"
    if line.startswith("get "):
        return "this looks like a tcp_table client: the map listener is another port"
    reason = re.split(r"[:;]", str(ex) or type(ex).__name__, maxsplit=1)[0]
    sent = printable(line.rstrip("\r\n").encode("latin-1", "replace"))  # pywsgi's decoding
    if len(sent) > _QUOTED:
        sent = sent[:_QUOTED] + "..."
    return f"{reason}; request line {sent}"


def served_tables(address: Address, timeout: float = 10.0) -> list[list[str]]:
    """What the server with a metrics listener at ADDRESS serves: NAME: VALUE lines per map.

    Raises OSError when it cannot be reached, ValueError for a reply that is not ours.
    """
    url = f"http://{address}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        text = reply.read().decode("utf-8")
    by_map: dict[str, dict[str, str]] = {}
    for family in text_string_to_metric_families(text):  # type: ignore[no-untyped-call,unused-ignore]
        for sample in family.samples:
            name = sample.labels.get("map")
            if name is None or not sample.name.startswith("tcpmap_table_"):
                continue
            fields = by_map.setdefault(name, {})
            if sample.name == "tcpmap_table_info":
                fields["file"] = sample.labels["path"]
            else:
                fields[sample.name] = _shown(sample.name, sample.value)
    if not by_map and "tcpmap_" not in text:
        raise ValueError(f"{url} is not a tcpmap-server's metrics")
    out = []
    for name, fields in sorted(by_map.items()):
        up = fields.get("tcpmap_table_up") == "1"
        lines = [f"map: {name}", f"file: {fields.get('file', '?')}"]
        lines.append("state: serving" if up else "state: unavailable (lookups answered 400/TEMP)")
        for metric, label in _INFO_FIELDS:
            if metric in fields:
                lines.append(f"{label}: {fields[metric]}")
        out.append([*lines, ""])
    return out


_INFO_FIELDS = (
    ("tcpmap_table_records", "records"),
    ("tcpmap_table_size_bytes", "size bytes"),
    ("tcpmap_table_built_timestamp_seconds", "built at"),
    ("tcpmap_table_published_timestamp_seconds", "published at"),
    ("tcpmap_table_checks_total", "checks"),
    ("tcpmap_table_check_failures_total", "failed checks"),
)


def _shown(name: str, value: float) -> str:
    if name.endswith("_timestamp_seconds"):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return str(int(value)) if value == int(value) else str(value)
