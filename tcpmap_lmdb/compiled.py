"""Which form of the hot path runs: compiled by mypyc, or pure Python.

    python -P -m tcpmap_lmdb.compiled            # one line saying which, and where
    python -P -m tcpmap_lmdb.compiled --require  # exit 1 unless all of it is compiled

(-P: not the current directory's copy, in a checkout.)

setup.py compiles HOT_PATH when asked (TCPMAP_MYPYC=1); the .py files stay the
reference. A compiled module is imported from an extension module file (.so)
instead of its .py: that is how it is told apart.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from pathlib import Path

# The modules every lookup runs through, and verify, the check every table
# passes before it is served, most of a cold start (setup.py compiles exactly
# these). Not server.py: its connection loop is on every idle connection's
# stack, and as compiled C frames that stack costs 0.4 KB more per connection
# (10.3 KB, not 9.9), for about 18% fewer user-space instructions per lookup
# (README).
HOT_PATH = (
    "protocol",
    "socketmap",
    "responder",
    "sessions",
    "maps",
    "table",
    "dbformat",
    "watch",
    "verify",
)


def forms() -> dict[str, str]:
    """Each hot-path module's name: the file it was imported from."""
    files = {}
    for name in HOT_PATH:
        module = importlib.import_module(f"{__package__}.{name}")
        files[name] = str(module.__file__)
    return files


def is_compiled(path: str) -> bool:
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def describe() -> tuple[bool, str]:
    """(whether all of the hot path is compiled, one line saying which form runs and
    the package directory it runs from: `python -m` in a checkout reads the checkout's
    .py files, not the installed package)."""
    files = forms()
    where = Path(files[HOT_PATH[0]]).parent
    pure = [name for name, path in files.items() if not is_compiled(path)]
    if not pure:
        return True, f"hot path compiled with mypyc ({len(files)} modules, {where})"
    if len(pure) == len(files):
        return False, f"hot path is pure Python ({where})"
    return False, f"hot path partly compiled: pure Python {', '.join(pure)} ({where})"


def main(argv: list[str]) -> int:
    compiled, line = describe()
    print(f"tcpmap-lmdb: {line}")
    if "--require" in argv and not compiled:
        for name, path in forms().items():
            print(f"  {name}: {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
