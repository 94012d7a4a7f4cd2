"""The Debian package, installed, run, upgraded and purged in a booted Debian 12 and 13.

The package is architecture-specific: its hot path is compiled by the
release's own mypyc for the release's own Python, and dh_python3 makes it depend
on that Python (python3 (>= 3.11~), python3 (<< 3.12) on Debian 12). So for
each release it is built twice (this version, and a newer one for the upgrade)
in that release's debootstrapped tree (tests/debian_tree.py, cached between
runs, holds the build dependencies), by scripts/build-deb.sh, which lints it
with the release's lintian. Then a copy of the tree is booted with
systemd-nspawn, systemd as PID 1. There tests/system/inside.sh runs from a
oneshot unit, installs the two builds, writes one line per check to results.txt
and powers off. Needs root, debootstrap and systemd-nspawn. About a minute per
release with the trees cached; building a tree (debootstrap) adds a few minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from debian_tree import SUITES, debian_tree, remove

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ROOT / "tests" / "system"
BUDGET = 900.0  # seconds for one release: debootstrap, boot and checks
BUILD_BUDGET = 300.0  # seconds for building and linting one release's two .debs
TEST_DIR = "srv/tcpmap-test"  # in the tree, as inside.sh expects
UNIT = "tcpmap-system-test.service"
HOW_TO_ENABLE = (
    "needs root, debootstrap and systemd-nspawn: "
    "apt-get install debootstrap systemd-container, and run as root"
)


class Deadline:
    """The time left of a budget, handed to every command as its timeout."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        assert left > 0, f"{self.what} took more than {self.seconds:.0f} s"
        return left


def run(argv: list[str], deadline: Deadline, **env: str) -> str:
    """Run a command within the deadline; its output, or a failure showing it."""
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=deadline.left(),
        env={**os.environ, **env},
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{output[-5000:]}"
    return output


def require_tools() -> None:
    if os.geteuid() == 0 and shutil.which("debootstrap") and shutil.which("systemd-nspawn"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(HOW_TO_ENABLE, pytrace=False)
    pytest.skip(HOW_TO_ENABLE)


def build_debs(tree: Path, out: Path, deadline: Deadline) -> tuple[Path, Path]:
    """The package as `make deb` would build it on TREE's release, and the same code as a
    newer version (for the upgrade)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    debs = []
    for deb_version in (version, f"{version}+test1"):
        dest = out / deb_version
        build = ["sh", str(ROOT / "scripts" / "build-deb.sh")]
        env = {"TCPMAP_DEB_VERSION": deb_version, "TCPMAP_DEB_DEST": str(dest)}
        output = run(build, deadline, TCPMAP_DEB_TREE=str(tree), **env)
        print("\n".join(line for line in output.splitlines() if line.startswith("build-deb: ")))
        (deb,) = dest.glob(f"tcpmap-lmdb_{deb_version}_*.deb")  # _amd64, for this machine
        debs.append(deb)
    return debs[0], debs[1]


def prepare(tree: Path, root: Path, previous: Path, current: Path) -> None:
    """A fresh copy of the tree, with the debs, the checks and their unit enabled."""
    subprocess.run(["cp", "-a", str(tree), str(root)], check=True)
    test_dir = root / TEST_DIR
    for name, deb in (("previous", previous), ("current", current)):
        (test_dir / name).mkdir(parents=True)
        shutil.copy2(deb, test_dir / name)
    shutil.copy2(SYSTEM / "inside.sh", test_dir)
    shutil.copy2(SYSTEM / "client.py", test_dir)
    shutil.copy2(SYSTEM / "abuse.py", test_dir)
    shutil.copy2(SYSTEM / UNIT, root / "etc/systemd/system")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / UNIT).symlink_to(f"/etc/systemd/system/{UNIT}")


def boot(root: Path, deadline: Deadline) -> str:
    """Boot the tree until the checks power it off; the console output."""
    seconds = int(deadline.left())
    nspawn = ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit"]
    result = subprocess.run(
        # timeout sends SIGTERM first: nspawn then shuts the container down.
        ["timeout", "--kill-after=15", str(seconds), *nspawn, "--private-network", "-b"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    return f"exit {result.returncode}\n{result.stdout}{result.stderr}"


def journal(root: Path) -> str:
    directory = root / "var/log/journal"
    argv = ["journalctl", "-D", str(directory), "--no-pager", "-o", "short-monotonic"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def tcpmap_lines(text: str) -> str:
    """The journal's lines from tcpmap's processes and units, last 30,000 characters."""
    lines = [line for line in text.splitlines() if "tcpmap" in line and " sh[" not in line]
    return "\n".join(lines)[-30000:]


def all_passed(results: str) -> bool:
    """Only "ok" lines, and the summary line that inside.sh writes last counts them."""
    *checks, summary = results.splitlines() or [""]
    return (
        bool(checks)
        and all(line.startswith("ok ") for line in checks)
        and summary == f"result: {len(checks)} passed, 0 failed"
    )


def release_tree(suite: str, deadline: Deadline) -> Path:
    try:
        return debian_tree(suite, timeout=deadline.left())
    except subprocess.CalledProcessError as error:
        pytest.fail(f"debootstrap {suite} failed:\n{error.stdout}{error.stderr}", pytrace=False)


@pytest.mark.parametrize("suite", SUITES)
def test_package_installs_runs_upgrades_and_purges(suite: str, tmp_path: Path) -> None:
    """Every check of tests/system/inside.sh passes in a booted Debian 12 and Debian 13."""
    require_tools()
    deadline = Deadline(BUDGET, f"the system test on {suite}")
    tree = release_tree(suite, deadline)
    started = time.monotonic()
    build_deadline = Deadline(BUILD_BUDGET, f"building the .debs on {suite}")
    previous, current = build_debs(tree, tmp_path / "debs", build_deadline)
    print(f"{suite}: built and linted both .debs in {time.monotonic() - started:.0f} s")
    root = tmp_path / "root"
    try:
        prepare(tree, root, previous, current)
        started = time.monotonic()
        console = boot(root, deadline)
        print(f"{suite}: booted and checked in {time.monotonic() - started:.0f} s")
        results_file = root / TEST_DIR / "results.txt"
        results = results_file.read_text() if results_file.exists() else "(no results.txt)"
        for name in ("versions.txt", "timings.txt"):  # what ran, and how fast (pytest -s)
            if (root / TEST_DIR / name).exists():
                print(f"{suite} {name}:\n{(root / TEST_DIR / name).read_text()}")
        if not all_passed(results):
            pytest.fail(
                f"system test on {suite} failed:\n{results}\n--- console ---\n{console[-4000:]}\n"
                f"--- journal of the container (tail) ---\n{journal(root)[-30000:]}\n"
                f"--- tcpmap's own journal lines (tail) ---\n{tcpmap_lines(journal(root))}",
                pytrace=False,
            )
    finally:
        remove(root)
