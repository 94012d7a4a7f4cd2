"""Running Postfix's own postmap/postalias from tests.

Tests that need Postfix call require_postfix() at module level: the module is
skipped where Postfix is not installed, except under CI=true, where a missing
Postfix is a failure (CI must not go green by skipping the compatibility tests).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REASON = "needs Postfix: apt-get install postfix postfix-lmdb (make test installs it)"
# postmap and postalias live in /usr/sbin, which a non-root PATH often lacks.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def tool(name: str) -> str | None:
    """The full path of a Postfix command (postmap, postalias, postconf), or None."""
    return shutil.which(name, path=_SEARCH_PATH)


def require_postfix() -> None:
    """Skip the calling module or test when postmap is missing; fail instead under CI=true."""
    if tool("postmap") is not None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but Postfix is missing: {REASON}", pytrace=False)
    pytest.skip(REASON, allow_module_level=True)


def postfix_config_dir(tmp_path: Path) -> Path:
    """A config directory for `postmap -c DIR`: the tools refuse to run without main.cf."""
    config = tmp_path / "postfix-config"
    config.mkdir(exist_ok=True)
    main_cf = config / "main.cf"
    # 3.6 silences the "using backwards-compatible default setting" warnings.
    main_cf.write_text("compatibility_level = 3.6\n")
    # Postfix will not read a main.cf changed within the last second (it may be
    # half written): it dozes 0.3 s at a time until it is older. Date it back.
    an_hour_ago = time.time() - 3600
    os.utime(main_cf, (an_hour_ago, an_hour_ago))
    return config


def run_postfix(
    name: str, config: Path, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a Postfix command with -c config; output is captured, the exit status not checked."""
    path = tool(name)
    if path is None:
        pytest.fail(REASON, pytrace=False)
    return subprocess.run(
        [path, "-c", str(config), *args], input=stdin, capture_output=True, timeout=60, check=False
    )
