"""Prometheus metrics, served by a real server on loopback and scraped over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from activation import Activated, exec_start, tcp_listener
from conftest import (
    Conn,
    MakeTable,
    ServerProcess,
    SocketmapConn,
    StartServer,
    assert_refused_beyond_loopback,
)
from prometheus_client.parser import text_string_to_metric_families

from tcpmap_lmdb.counters import LATENCY_SAMPLE

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics", timeout: float = 5) -> Samples:
    """Every sample of one scrape, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    # prometheus_client 0.16 leaves the parser untyped; later versions type it.
    families = text_string_to_metric_families(text)  # type: ignore[no-untyped-call,unused-ignore]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def metrics_port(srv: ServerProcess) -> int:
    return int(srv.wait_for_log(r"127\.0\.0\.1:(\d+) serves metrics").group(1))


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", {"alice@example.com": "alice@example.net"})


@pytest.fixture
def metered(server: StartServer, db: Path) -> tuple[ServerProcess, int]:
    srv = server(db, "--listen", "127.0.0.1:0", "--listen", "metrics:127.0.0.1:0")
    return srv, metrics_port(srv)


def test_lookups_counted_by_map_protocol_and_result(
    server: StartServer, db: Path, tmp_path: Path
) -> None:
    """Each lookup is counted once, by map, protocol and result; the histogram counts the
    sampled reads."""
    sock = tmp_path / "sm.sock"
    srv = server(
        db,
        "--listen",
        "127.0.0.1:0",
        "--listen",
        f"socketmap:unix:{sock}",
        "--listen",
        "metrics:127.0.0.1:0",
    )
    port = metrics_port(srv)
    with srv.connect() as conn:
        assert conn.ask("alice@example.com")[0] == 200
        assert conn.ask("alice@example.com")[0] == 200
        assert conn.ask("nobody")[0] == 500
        assert conn.exchange(b"get bad%zz\n").startswith(b"400 ")
    with SocketmapConn(sock) as sm:
        assert sm.ask(b"virtual", b"alice@example.com")[0] == b"OK"
        assert sm.ask(b"virtual", b"nobody")[0] == b"NOTFOUND"
        assert sm.ask(b"nosuchmap", b"k")[0] == b"PERM"
    got = scrape(port)

    def lookups(map_: str, protocol: str, result: str) -> float:
        labels = (("map", map_), ("protocol", protocol), ("result", result))
        return got[("tcpmap_lookups_total", labels)]

    assert lookups("virtual", "tcp_table", "found") == 2
    assert lookups("virtual", "tcp_table", "notfound") == 1
    assert lookups("virtual", "tcp_table", "temporary") == 1
    assert lookups("virtual", "socketmap", "found") == 1
    assert lookups("virtual", "socketmap", "notfound") == 1
    assert lookups("", "socketmap", "permanent") == 1
    # Seven reads, one lookup each: the first read in every LATENCY_SAMPLE is timed.
    timed = -(-7 // LATENCY_SAMPLE)
    assert got[("tcpmap_lookup_duration_seconds_count", ())] == timed
    assert got[("tcpmap_lookup_duration_seconds_bucket", (("le", "+Inf"),))] == timed
    assert 0 < got[("tcpmap_lookup_duration_seconds_sum", ())] < timed


def test_the_latency_histogram_times_one_read_in_the_sample(
    metered: tuple[ServerProcess, int],
) -> None:
    """LATENCY_SAMPLE x 3 reads of one lookup each, on two connections: 3 are timed."""
    srv, port = metered
    with srv.connect() as first, srv.connect() as second:
        for index in range(LATENCY_SAMPLE * 3):
            conn = first if index % 2 else second
            assert conn.ask("alice@example.com")[0] == 200
    got = scrape(port)
    assert got[("tcpmap_lookup_duration_seconds_count", ())] == 3
    assert (
        got[
            (
                "tcpmap_lookups_total",
                (("map", "virtual"), ("protocol", "tcp_table"), ("result", "found")),
            )
        ]
        == LATENCY_SAMPLE * 3
    )


def test_table_metrics(metered: tuple[ServerProcess, int], db: Path) -> None:
    """Records, size, build and publication times of each map, and its check."""
    _, port = metered
    got = scrape(port)
    label = (("map", "virtual"),)
    assert got[("tcpmap_table_up", label)] == 1
    assert got[("tcpmap_table_records", label)] == 1
    assert got[("tcpmap_table_size_bytes", label)] == db.stat().st_size
    assert got[("tcpmap_table_published_timestamp_seconds", label)] == pytest.approx(
        db.stat().st_ctime
    )
    assert abs(got[("tcpmap_table_built_timestamp_seconds", label)] - db.stat().st_mtime) < 5
    assert got[("tcpmap_table_checks_total", label)] == 1
    assert got[("tcpmap_table_check_failures_total", label)] == 0
    assert 0 < got[("tcpmap_table_last_check_duration_seconds", label)] < 10


def test_a_bad_publication_counts_a_failed_check(
    metered: tuple[ServerProcess, int], db: Path
) -> None:
    """A new file that is not a table: one check more, one failure, the map still up."""
    srv, port = metered
    bad = db.with_name(".bad")
    bad.write_bytes(b"\0" * 8192)
    os.replace(bad, db)
    with srv.connect() as conn:
        conn.ask("alice@example.com")
    label = (("map", "virtual"),)
    got = scrape(port)
    assert got[("tcpmap_table_checks_total", label)] == 2
    assert got[("tcpmap_table_check_failures_total", label)] == 1


def test_connections_accepted_open_and_closed_by_reason(server: StartServer, db: Path) -> None:
    """client: the client hung up; idle: the idle timeout; error: an over-long line."""
    srv = server(
        db, "--idle-timeout", "0.3", "--listen", "127.0.0.1:0", "--listen", "metrics:127.0.0.1:0"
    )
    port = metrics_port(srv)
    with srv.connect() as conn:
        conn.ask("alice@example.com")
    with srv.connect() as idle:
        idle.read_eof(timeout=5)
    with srv.connect() as broken:
        broken.send(b"x" * 20000 + b"\n")
        assert broken.read_line().startswith(b"400 ")
        broken.read_eof(timeout=5, reset_ok=True)
    held = srv.connect()
    held.ask("alice@example.com")
    got = scrape(port)
    held.close()
    assert got[("tcpmap_connections_accepted_total", ())] == 4
    assert got[("tcpmap_connections_open", ())] == 1
    closed = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "tcpmap_connections_closed_total"
    }
    assert closed == {"client": 1, "idle": 1, "error": 1, "limit": 0, "shutdown": 0}


def test_reloads_counted(metered: tuple[ServerProcess, int]) -> None:
    srv, port = metered
    since = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for_log(r"SIGHUP: re-opening", since=since)
    srv.wait_for_log(r"opened .*virtual\.lmdb", since=since)
    assert scrape(port)[("tcpmap_reloads_total", ())] == 1


def test_only_metrics_is_served(metered: tuple[ServerProcess, int]) -> None:
    """The metrics listener answers /metrics only, and never a map request."""
    _, port = metered
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(port, "/other")
    assert caught.value.code == 404
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"get alice@example.com\n\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b"alice@example.net" not in reply


def test_process_metrics_too(metered: tuple[ServerProcess, int]) -> None:
    """prometheus_client's process collector: the server's own CPU, memory, descriptors."""
    _, port = metered
    got = scrape(port)
    assert got[("process_open_fds", ())] > 0


def test_metrics_beyond_loopback_is_refused(db: Path) -> None:
    """--listen metrics:0.0.0.0:PORT: the loopback rule of the map listeners."""
    assert_refused_beyond_loopback("--db", db, "--listen", "metrics:0.0.0.0:9612")


def test_metrics_from_a_systemd_socket(db: Path, tmp_path: Path) -> None:
    """A socket named 'metrics' (FileDescriptorName=metrics) serves /metrics."""
    maps, metrics = tcp_listener("127.0.0.1"), tcp_listener("127.0.0.1")
    server = Activated(exec_start(db), [maps, metrics], ["tcp_table", "metrics"])
    try:
        server.wait_for_log("inherited socket 'metrics' from systemd")
        server.wait_for_log("serves metrics")
        with Conn(maps.getsockname()[1]) as conn:
            assert conn.ask("alice@example.com")[0] == 200
        got = scrape(metrics.getsockname()[1])
        labels = (("map", "virtual"), ("protocol", "tcp_table"), ("result", "found"))
        assert got[("tcpmap_lookups_total", labels)] == 1
    finally:
        assert server.stop() == 0
        maps.close()
        metrics.close()


def test_metrics_unit_is_loopback_and_named() -> None:
    """tcpmap-metrics.socket: loopback, FileDescriptorName=metrics, the same service."""
    from activation import unit_setting  # noqa: PLC0415

    unit = Path(__file__).resolve().parent.parent / "systemd" / "tcpmap-metrics.socket"
    assert unit_setting(unit, "ListenStream") == ["127.0.0.1:9612"]
    assert unit_setting(unit, "FileDescriptorName") == ["metrics"]
    assert unit_setting(unit, "Service") == ["tcpmap.service"]


def test_no_prometheus_client_without_a_metrics_listener() -> None:
    """Without metrics, the server does not even import prometheus_client."""
    code = (
        "import sys; from tcpmap_lmdb import server, cli;"
        "assert 'prometheus_client' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_dashboard_uses_only_metrics_we_serve(metered: tuple[ServerProcess, int]) -> None:
    """Every tcpmap_* series the Grafana dashboard queries is in a scrape."""
    _, port = metered
    dashboard = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"
    panels = json.loads(dashboard.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\btcpmap_\w+", expr)}
    served = {name for name, _ in scrape(port)}
    assert used - served == set()
    assert len(used) >= 14


def test_query_info_through_the_metrics_listener(
    metered: tuple[ServerProcess, int], db: Path
) -> None:
    """tcpmap-query --info metrics:HOST:PORT: each map's file, state, records, times."""
    _, port = metered
    code = "import sys; from tcpmap_lmdb.cli import query_main as m; sys.exit(m())"
    result = subprocess.run(
        [sys.executable, "-c", code, "--info", f"metrics:127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["map: virtual", f"file: {db}", "state: serving", "records: 1"]
    assert f"size bytes: {db.stat().st_size}" in lines
    assert any(line.startswith("published at: 20") for line in lines)


def test_a_check_that_found_the_table_locked_is_not_counted(tmp_path: Path) -> None:
    """A writer's lock makes the check give up at once and retry (snapshot.Locked): that
    is no check, and no failed one; a bad file is one that failed."""
    from tcpmap_lmdb.counters import CheckStats  # noqa: PLC0415
    from tcpmap_lmdb.snapshot import Locked, TableError  # noqa: PLC0415

    stats = CheckStats()
    table = tmp_path / "virtual.lmdb"

    def locked(path: Path) -> None:
        raise Locked(f"{path} is locked by a writer")

    def bad(path: Path) -> None:
        raise TableError(f"{path} is not an LMDB table")

    for _ in range(3):
        with pytest.raises(Locked):
            stats.counting(locked)(table)
    assert (stats.run, stats.failed) == ({}, {})
    with pytest.raises(TableError):
        stats.counting(bad)(table)
    assert (stats.run, stats.failed) == ({"virtual": 1}, {"virtual": 1})
    assert stats.counting(lambda path: path.name)(table) == "virtual.lmdb"
    assert (stats.run, stats.failed) == ({"virtual": 2}, {"virtual": 1})
