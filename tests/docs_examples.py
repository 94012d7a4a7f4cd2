"""Run documented shell commands against a real tcpmap-server, inside a network namespace.

Run as `unshare -r -n python docs_examples.py DIR` with a JSON request on stdin:
{"server": [tcpmap-server's arguments], "commands": [shell lines]}. In the new
namespace loopback is private, so the documentation's own addresses
(127.0.0.1:4242, ...) are free to use literally. DIR becomes the working
directory; build/virtual.lmdb is built there from examples/virtual, and
`tcpmap-query`, `tcpmap-server` and `.venv/bin/tcpmap-query` run this checkout's code.
Prints one JSON object per command: its exit status, stdout and stderr.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import START_TIMEOUT, LoggedProcess

ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = {
    "tcpmap-query": "from tcpmap_lmdb.cli import query_main as m",
    "tcpmap-server": "from tcpmap_lmdb.server_cli import server_main as m",
    "tcpmap-build": "from tcpmap_lmdb.cli import build_main as m",
}


def _commands(directory: Path) -> Path:
    """bin/ with this checkout's commands (and .venv/bin/ for the README's quick start)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    (directory / ".venv").mkdir()
    (directory / ".venv" / "bin").symlink_to(bin_dir)
    for name, launcher in LAUNCHERS.items():
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {launcher}; sys.exit(m())"
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n'
        )
        script.chmod(0o755)
    return bin_dir


def main() -> int:
    directory = Path(sys.argv[1]).resolve()
    request = json.load(sys.stdin)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.chdir(directory)
    bin_dir = _commands(directory)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    (directory / "build").mkdir()
    subprocess.run(
        [bin_dir / "tcpmap-build", "-q", "-o", "build/virtual.lmdb", ROOT / "examples/virtual"],
        check=True,
        env=env,
    )
    server = request["server"]
    proc = subprocess.Popen(
        [bin_dir / "tcpmap-server", *server],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    logged = LoggedProcess(proc, proc.stdout)
    try:
        listeners = sum(1 for arg in server if arg == "--listen")
        logged.wait_for_logs(r"INFO: listening on ", listeners, timeout=START_TIMEOUT)
        for command in request["commands"]:
            done = subprocess.run(
                ["sh", "-c", command],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=env,
            )
            print(json.dumps({"rc": done.returncode, "out": done.stdout, "err": done.stderr}))
    finally:
        status = logged.stop()
    tracebacks = [line for line in logged.logs if re.search("Traceback", line)]
    return 1 if status != 0 or tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
