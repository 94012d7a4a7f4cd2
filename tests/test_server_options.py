"""tcpmap-server's options: numbers that make no sense, and a metrics listener given alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from activation import Activated, exec_start, tcp_listener
from conftest import START_TIMEOUT, Conn, LoggedProcess, MakeTable, server_command, start_server

from tcpmap_lmdb import listeners
from tcpmap_lmdb.config import DEFAULT_LISTEN, TCP_TABLE, ConfigError, ListenSpec, ServerConfig


@pytest.fixture
def db(tmp_path: Path, make_table: MakeTable) -> Path:
    return make_table(tmp_path / "virtual.lmdb", {"k": "v"})


# --- numbers ------------------------------------------------------------------------------

BAD_NUMBERS = [
    ("--idle-timeout", "nan"),
    ("--idle-timeout", "inf"),
    ("--idle-timeout", "-inf"),
    ("--idle-timeout", "1e400"),  # float() makes it inf
    ("--idle-timeout", "0"),
    ("--idle-timeout", "-1"),
    ("--stop-timeout", "nan"),
    ("--stop-timeout", "inf"),
    ("--stop-timeout", "-1"),
    ("--stop-timeout", "-0.5"),
    ("--max-connections", "0"),
    ("--max-connections", "-1"),
    ("--max-connections", "100000000"),  # over Linux's most open files (fs.nr_open)
]


@pytest.mark.parametrize(("option", "value"), BAD_NUMBERS)
def test_nonsensical_numbers_are_refused(db: Path, option: str, value: str) -> None:
    """Refused before anything starts, with the option and the value named."""
    try:
        result = subprocess.run(
            server_command("--db", db, f"{option}={value}", "--listen", "127.0.0.1:0"),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{option} {value} was taken: the server started. {exc.stderr!r}")
    assert result.returncode == 2, result.stderr
    assert option in result.stderr and value in result.stderr, result.stderr
    assert "listening" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("idle_timeout", float("nan"), "--idle-timeout nan"),
        ("idle_timeout", float("inf"), "--idle-timeout inf"),
        ("stop_timeout", float("nan"), "--stop-timeout nan"),
        ("stop_timeout", -1.0, "--stop-timeout -1"),
        ("max_connections", 0, "--max-connections 0"),
        ("output_budget", 0, "output_budget 0"),
        ("output_budget", -1, "output_budget -1"),
    ],
)
def test_config_refuses_nonsensical_numbers(db: Path, field: str, value: float, named: str) -> None:
    """The same checks hold for a ServerConfig made in code."""
    with pytest.raises(ConfigError, match=named):
        ServerConfig(db=db, **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--idle-timeout", "0.5"), ("--stop-timeout", "0"), ("--max-connections", "1")],
)
def test_sensible_edge_numbers_are_taken(db: Path, option: str, value: str) -> None:
    """--stop-timeout 0: answer nothing more on SIGTERM; the smallest values that mean something."""
    proc = start_server(["--db", db, f"{option}={value}", "--listen", "127.0.0.1:0"])
    server = LoggedProcess(proc, proc.stdout)
    try:
        server.wait_for_log(r"listening on 127\.0\.0\.1:\d+", timeout=START_TIMEOUT)
    finally:
        server.check_clean_exit()


# --- a metrics listener alone ----------------------------------------------------------------


def test_metrics_listener_alone_keeps_the_default_map_listener(db: Path) -> None:
    """--listen metrics:... is not a map listener: the default one stays (README, --listen)."""
    config = ServerConfig(db=db, listen=(ListenSpec.parse("metrics:127.0.0.1:9612"),))
    specs = config.listeners
    assert specs[0].address == DEFAULT_LISTEN and specs[0].binding.protocol == TCP_TABLE
    assert specs[1:] == config.listen
    with_map = ServerConfig(db=db, listen=(ListenSpec.parse("127.0.0.1:1"), *config.listen))
    assert with_map.listeners == with_map.listen


def test_server_with_only_a_metrics_listener_serves_maps_on_the_default(db: Path) -> None:
    """The real server: it listens on 127.0.0.1:4242 for tcp_table, or, if something else
    holds that port here, fails to start naming it; it never serves metrics alone."""
    proc = start_server(["--db", db, "--listen", "metrics:127.0.0.1:0"])
    server = LoggedProcess(proc, proc.stdout)
    try:
        line = server.wait_for_log(
            r"listening on 127\.0\.0\.1:\d+|cannot listen on 127\.0\.0\.1:4242",
            timeout=START_TIMEOUT,
        )
        if line.group(0).startswith("cannot"):
            assert server.proc.wait(START_TIMEOUT) == 1
            return
        assert line.group(0) == "listening on 127.0.0.1:4242", server.logs
        server.wait_for_log(r"127\.0\.0\.1:4242 serves tcp_table \(the default: no --listen")
        server.wait_for_log(r"serves metrics \(--listen\)")
        with Conn(4242) as conn:
            assert conn.ask("k") == (200, b"v")
    finally:
        if server.proc.poll() is None:
            server.check_clean_exit()


def test_the_log_tells_the_default_listener_from_the_given_ones() -> None:
    """Each bound listener's origin, as its log line shows it: --listen, or the default."""
    maps, metrics = ListenSpec.parse("127.0.0.1:0"), ListenSpec.parse("metrics:127.0.0.1:0")
    cases = [((maps, metrics), (metrics,)), ((maps,), ()), ((maps, metrics), (maps, metrics))]
    origins = []
    for specs, given in cases:
        endpoints = listeners._bind_all(specs, given)
        origins.append([endpoint.origin for endpoint in endpoints])
        for endpoint in endpoints:
            endpoint.sock.close()
    assert origins == [
        ["the default: no --listen serves maps", "--listen"],
        ["the default"],
        ["--listen", "--listen"],
    ]


def test_systemd_passing_only_a_metrics_socket_is_refused(db: Path) -> None:
    """Socket activation with only FileDescriptorName=metrics: nothing would serve maps.

    The service cannot bind an address itself (its unit has PrivateNetwork=yes), so it
    refuses to start and says which socket is missing.
    """
    metrics = tcp_listener("127.0.0.1")
    server = Activated(exec_start(db), [metrics], ["metrics"])
    try:
        server.wait_for_log(r"only a metrics socket.*tcpmap\.socket")
        assert server.proc.wait(START_TIMEOUT) == 1
    finally:
        server.kill()
        metrics.close()
