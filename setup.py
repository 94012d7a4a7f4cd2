"""Build tcpmap-lmdb: pure Python, or with TCPMAP_MYPYC=1 its hot path compiled by mypyc.

    pip install .                                    # pure Python (the reference)
    TCPMAP_MYPYC=1 pip install --no-build-isolation .   # compiled, mypy installed beside

The metadata is in pyproject.toml; this file only adds the compiled modules.
The compiled form is the same source compiled by mypyc (`mypy --strict` clean
is what it needs); the .py files are installed beside the .so files, and
Python imports the .so first. Whatever goes wrong (no mypyc, no C compiler, a
compile error, an editable install, which must run the edited .py files) the
build prints one line saying why and installs pure Python: it never fails
because of the compiled form.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

PACKAGE = Path(__file__).resolve().parent / "tcpmap_lmdb"
sys.path.insert(0, str(PACKAGE.parent))  # the list of modules, from the source tree
from tcpmap_lmdb.compiled import HOT_PATH  # noqa: E402


def say(message: str) -> None:
    print(f"tcpmap-lmdb: {message}", file=sys.stderr, flush=True)


def compiled_modules() -> list[Any]:
    """mypyc's extensions for HOT_PATH when TCPMAP_MYPYC=1 and mypyc is there, else []."""
    if os.environ.get("TCPMAP_MYPYC") != "1":
        return []
    try:
        import mypy.version  # noqa: PLC0415 - only a compiled build needs mypy
        from mypyc.build import mypycify  # noqa: PLC0415
    except ImportError as exc:
        say(f"TCPMAP_MYPYC=1 but mypyc is missing ({exc}): building pure Python")
        return []
    try:
        files = [f"tcpmap_lmdb/{name}.py" for name in HOT_PATH]
        # One group with a name, not a hash: the C runtime the modules share is
        # the extension tcpmap_lmdb.hot__mypyc, inside the package.
        shutil.rmtree("build/mypyc", ignore_errors=True)  # C another mypyc generated
        extensions = mypycify(
            files, opt_level="3", separate=[(files, "tcpmap_lmdb.hot")], target_dir="build/mypyc"
        )
        return list(extensions)
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        say(f"mypyc {mypy.version.__version__} cannot compile the hot path ({exc}): pure Python")
        return []


class OptionalBuildExt(build_ext):
    """build_ext that falls back to pure Python instead of failing."""

    def run(self) -> None:
        if self.inplace or getattr(self, "editable_mode", False):
            if self.extensions:
                say("an editable install runs the .py files: not compiling the hot path")
            self.extensions = []
            return
        # The build directory is reused: what an earlier build compiled must not
        # be shipped by this one (a fallback, or another list of modules).
        for stale in Path(self.build_lib).glob("**/*.so"):
            stale.unlink()
        # And its objects: another interpreter or mypyc may have built them.
        shutil.rmtree(self.build_temp, ignore_errors=True)
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # no compiler, a compile or link error
            for built in self.get_outputs():
                Path(built).unlink(missing_ok=True)  # no half-compiled package
            self.extensions = []
            say(f"compiling the hot path failed ({exc}): building pure Python")
            return
        say(f"hot path compiled with mypyc: {', '.join(HOT_PATH)}")

    def get_outputs(self) -> list[str]:
        return list(super().get_outputs()) if self.extensions else []


setup(ext_modules=compiled_modules(), cmdclass={"build_ext": OptionalBuildExt})
