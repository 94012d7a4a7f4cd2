"""The optional compiled build (setup.py): it falls back to pure Python, never fails.

Each test builds a copy of the project with setup.py, the way pip's build
backend runs it, and looks at what was built and at what the build said. That
the compiled form itself passes the whole suite is `make test-compiled`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpmap_lmdb.compiled import HOT_PATH, describe

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300.0
# setup.py run as pip's backend runs it; BLOCK names modules made unimportable first.
_RUN_SETUP = """
import runpy, sys
for name in sys.argv[1].split():
    sys.modules[name] = None
sys.argv = ["setup.py", "build", "--build-lib", sys.argv[2]]
runpy.run_path("setup.py", run_name="__main__")
"""


def build(tmp_path: Path, env: dict[str, str], block: str = "") -> tuple[Path, list[str]]:
    """Build a copy of the project (the same one again if built before) into one
    build/lib; (that package, the lines setup.py said about the build)."""
    source = tmp_path / "source"
    if not source.exists():
        source.mkdir()
        for name in ("setup.py", "pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, source)
        shutil.copytree(ROOT / "tcpmap_lmdb", source / "tcpmap_lmdb", ignore=_not_source)
    lib = tmp_path / "lib"
    result = subprocess.run(
        [sys.executable, "-c", _RUN_SETUP, block, str(lib)],
        cwd=source,
        env={k: v for k, v in os.environ.items() if k not in ("TCPMAP_MYPYC", "CC")} | env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    said = [line for line in output.splitlines() if line.startswith("tcpmap-lmdb: ")]
    return lib / "tcpmap_lmdb", said


def _not_source(_directory: str, names: list[str]) -> list[str]:
    return [name for name in names if not name.endswith((".py", ".typed"))]


def assert_pure(package: Path) -> None:
    assert sorted(p.name for p in package.glob("*.so")) == []
    for name in HOT_PATH:
        assert (package / f"{name}.py").is_file()


def test_pure_by_default_and_silent(tmp_path: Path) -> None:
    package, said = build(tmp_path, {})
    assert_pure(package)
    assert said == []


def test_a_missing_mypyc_builds_pure_python_with_one_line(tmp_path: Path) -> None:
    package, said = build(tmp_path, {"TCPMAP_MYPYC": "1"}, block="mypyc mypyc.build")
    assert_pure(package)
    assert len(said) == 1, said
    assert "mypyc is missing" in said[0] and "pure Python" in said[0]


def test_a_failed_compile_builds_pure_python_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("mypyc.build", reason="needs mypy (pip install -e '.[dev]')")
    # A C compiler that fails: what a missing gcc or a compile error comes to.
    package, said = build(tmp_path, {"TCPMAP_MYPYC": "1", "CC": "false"})
    assert_pure(package)
    assert len(said) == 1, said
    assert "compiling the hot path failed" in said[0] and "pure Python" in said[0]


def test_a_fallback_after_a_compiled_build_ships_nothing_compiled(tmp_path: Path) -> None:
    """The build directory is reused: a fallback must not pick up the last build's .so."""
    pytest.importorskip("mypyc.build", reason="needs mypy (pip install -e '.[dev]')")
    package, said = build(tmp_path, {"TCPMAP_MYPYC": "1"})
    assert said == [f"tcpmap-lmdb: hot path compiled with mypyc: {', '.join(HOT_PATH)}"]
    assert {p.name.split(".")[0] for p in package.glob("*.so")} == {*HOT_PATH, "hot__mypyc"}
    package, said = build(tmp_path, {"TCPMAP_MYPYC": "1", "CC": "false"})
    assert len(said) == 1 and "failed" in said[0], said
    assert_pure(package)


def test_the_form_under_test_is_named() -> None:
    """The line `python -m tcpmap_lmdb.compiled` prints matches the modules' files."""
    compiled, line = describe()
    expected = os.environ.get("TCPMAP_EXPECT_COMPILED") == "1"
    assert compiled == expected, line


def test_the_line_names_the_package_it_describes(tmp_path: Path) -> None:
    """`python3 -m tcpmap_lmdb.compiled` run in a checkout (as README's block, "From a
    checkout", reads) describes the checkout's pure .py files, not the installed package
    (python -m puts the current directory first): the line names the directory it read,
    so a compiled install is not reported pure Python without a word of where from."""
    shadow = tmp_path / "checkout"
    shutil.copytree(ROOT / "tcpmap_lmdb", shadow / "tcpmap_lmdb", ignore=_not_source)
    result = subprocess.run(
        [sys.executable, "-m", "tcpmap_lmdb.compiled"],
        cwd=shadow,
        env={k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == f"tcpmap-lmdb: hot path is pure Python ({shadow / 'tcpmap_lmdb'})\n"
