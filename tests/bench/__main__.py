"""`python -m tests.bench`: make sure the bench environment exists, then run the driver in it.

The bench environment (.venv-bench) holds what the project does not depend on:
Twisted (the peer), matplotlib (the chart), py-spy and pyinstrument (profiling).
It is created with the interpreter running this, and re-synced when
requirements.txt changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_ENV = ROOT / ".venv-bench"
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
STAMP = BENCH_ENV / "requirements.installed"


def ensure_bench_env() -> Path:
    """The bench environment's python, created or updated as needed."""
    python = BENCH_ENV / "bin" / "python"
    if not python.exists():
        print(f"bench: creating {BENCH_ENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(BENCH_ENV)
    ignore = BENCH_ENV / ".gitignore"
    if not ignore.exists():  # like Python 3.13's venv: git (and so ruff) skips it all
        ignore.write_text("*\n")
    wanted = REQUIREMENTS.read_text()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        print(f"bench: installing {REQUIREMENTS.name} into {BENCH_ENV}", file=sys.stderr)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        STAMP.write_text(wanted)
    return python


def main() -> None:
    if Path(sys.prefix).resolve() != BENCH_ENV.resolve():
        python = ensure_bench_env()
        os.chdir(ROOT)
        os.execv(python, [str(python), "-m", "tests.bench", *sys.argv[1:]])  # noqa: S606 - no shell wanted
    from .driver import main as driver_main  # noqa: PLC0415 - needs the bench environment

    sys.exit(driver_main(sys.argv[1:]))


main()
