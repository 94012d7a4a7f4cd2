"""tcpmap-build@.path and tcpmap-build@.service: clean units, and the service's build loop.

The booted-container system test (tests/system/inside.sh) runs them under a real
systemd on Debian 12 and 13; here the unit files are verified, and the
service's ExecStart= runs as systemd would run it (specifiers and $$ expanded),
with tcpmap-build from this checkout.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import raw_items

ROOT = Path(__file__).resolve().parent.parent
PATH_UNIT = ROOT / "systemd" / "tcpmap-build@.path"
SERVICE_UNIT = ROOT / "systemd" / "tcpmap-build@.service"
INSTALLED_BUILD = "/usr/bin/tcpmap-build"


def unit_lines(unit: Path) -> list[str]:
    """KEY=VALUE lines of a unit, continuation lines joined (a trailing \\ is a space)."""
    lines: list[str] = []
    pending = ""
    for raw in unit.read_text().splitlines():
        if not pending and (raw.startswith(("#", ";")) or not raw.strip()):
            continue
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        lines.append((pending + raw).strip())
        pending = ""
    return lines


def setting(unit: Path, key: str) -> list[str]:
    return [v for k, _, v in (line.partition("=") for line in unit_lines(unit)) if k == key]


def exec_start(source: Path, build: Path, escape_path: bool = True) -> list[str]:
    """The service's ExecStart= for the instance of SOURCE, as systemd expands it.

    %I is the unescaped instance: SOURCE without its leading / for an instance
    made by `systemd-escape --path`, SOURCE itself for one made without --path.
    """
    (command,) = setting(SERVICE_UNIT, "ExecStart")
    instance = str(source).removeprefix("/") if escape_path else str(source)
    argv = []
    for word in shlex.split(command):
        expanded = word.replace("%I", instance).replace("%%", "%").replace("$$", "$")
        argv.append(expanded.replace(INSTALLED_BUILD, str(build)))
    return argv


@pytest.fixture
def tcpmap_build(tmp_path: Path) -> Path:
    """An executable running this checkout's tcpmap-build, for /usr/bin/tcpmap-build."""
    script = tmp_path / "bin" / "tcpmap-build"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m tcpmap_lmdb.build "$@"\n')
    script.chmod(0o755)
    return script


def run_service(
    source: Path, build: Path, options: str = "", escape_path: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        exec_start(source, build, escape_path),
        env={**os.environ, "TCPMAP_BUILD_OPTIONS": options, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_units_verify_clean(tmp_path: Path) -> None:
    """systemd-analyze verify of an instance of each: exit 0 and no warning."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze missing: apt-get install systemd", pytrace=False)
        pytest.skip("systemd-analyze missing: apt-get install systemd")
    # Instances named by `systemd-escape --path /etc/postfix/virtual`, and without --path.
    instances = ("tcpmap-build@etc-postfix-virtual", "tcpmap-build@-etc-postfix-virtual")
    for unit in (PATH_UNIT, SERVICE_UNIT):
        shutil.copy(unit, tmp_path / unit.name)
        for instance in instances:
            (tmp_path / f"{instance}{unit.suffix}").symlink_to(unit.name)
    names = [f"{instance}{suffix}" for instance in instances for suffix in (".path", ".service")]
    result = subprocess.run(
        [tool, "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_path_unit_watches_the_instance_path() -> None:
    assert setting(PATH_UNIT, "PathChanged") == ["/%I"]
    assert setting(PATH_UNIT, "WantedBy") == ["paths.target"]
    assert setting(SERVICE_UNIT, "Type") == ["oneshot"]


def test_default_output_is_beside_the_source(tmp_path: Path, tcpmap_build: Path) -> None:
    source = tmp_path / "virtual"
    source.write_text("a@example.com b@example.net\n")
    done = run_service(source, tcpmap_build)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "virtual.lmdb").is_file()


def test_options_set_the_output(tmp_path: Path, tcpmap_build: Path) -> None:
    source = tmp_path / "virtual"
    source.write_text("a@example.com b@example.net\n")
    out = tmp_path / "elsewhere.lmdb"
    done = run_service(source, tcpmap_build, f"-o {out}")
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    assert not (tmp_path / "virtual.lmdb").exists()


@pytest.mark.parametrize("escape_path", [True, False], ids=["--path", "no --path"])
def test_a_bad_source_fails_with_file_and_line_and_writes_nothing(
    tmp_path: Path, tcpmap_build: Path, escape_path: bool
) -> None:
    source = tmp_path / "virtual"
    source.write_text("a@example.com b@example.net\nbroken\n")
    done = run_service(source, tcpmap_build, escape_path=escape_path)
    assert done.returncode == 1
    assert f"{source}:2:" in done.stderr
    assert not (tmp_path / "virtual.lmdb").exists()


def test_a_save_during_the_build_is_built_too(tmp_path: Path, tcpmap_build: Path) -> None:
    """systemd starts no second build for a change while one runs: the loop must."""
    source = tmp_path / "virtual"
    source.write_text("a@example.com first\n")
    calls = tmp_path / "calls"
    # The first build saves a new version of the source while it runs.
    saving = tmp_path / "bin" / "saving-build"
    saving.write_text(
        f"#!/bin/sh\necho x >>{calls}\n"
        f'[ "$(wc -l <{calls})" -gt 1 ] || echo "a@example.com second" >{source}\n'
        f'exec {tcpmap_build} "$@"\n'
    )
    saving.chmod(saving.stat().st_mode | stat.S_IXUSR)
    done = run_service(source, saving)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().count("x") == 2
    assert raw_items(tmp_path / "virtual.lmdb")[b"a@example.com\x00"] == b"second\x00"
