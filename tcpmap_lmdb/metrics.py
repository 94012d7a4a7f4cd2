"""Prometheus metrics: counted on the hot path as plain ints, turned into metrics at scrape.

A lookup bumps list and dict entries (counters.py); a scrape reads them
and the tables' state through a custom Collector (prometheus_client's
"custom collectors"), so no prometheus_client object is touched per lookup.
Served on its own listener by gevent.pywsgi and make_wsgi_app, on the server's
event loop: no thread. Coded against prometheus_client 0.16 (Debian 12; 0.21
in Debian 13). Names follow https://prometheus.io/docs/practices/naming/.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
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
from .counters import CheckStats, Latency, ServerStats
from .responder import Responder, SocketmapResponder

if TYPE_CHECKING:
    from .maps import Maps

log = logging.getLogger(__name__)

SCRAPERS = 4  # scrapes served at once; more wait in the listen queue


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
            "From a request read to its reply sent, inside the server (per read: requests "
            "pipelined in one read share its time).",
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


def wsgi_server(sock: Any, registry: CollectorRegistry) -> WSGIServer:
    """GET /metrics on SOCK (a listening gevent socket), on the running hub."""
    app = make_wsgi_app(registry)

    def only_metrics(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        return app(environ, start_response)

    return WSGIServer(sock, only_metrics, spawn=Pool(SCRAPERS), log=None, error_log=log)


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
