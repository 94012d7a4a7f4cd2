"""What the installed Postfix does differently by version: the stored form of alias names.

Postfix 3.11 and earlier store an aliases(5) name in the internal (unquoted)
form, `"Foo Bar": x` as the key `foo bar`; from snapshot 3.12-20260312 on,
postalias stores the external (quoted) form `"foo bar"` and Postfix looks the
internal form up only when the external one is missing (Postfix HISTORY
20260312; postalias(1)). Debian 12 ships 3.7, Debian 13 ships 3.10.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Literal

AliasNames = Literal["internal", "external"]

EXTERNAL_SINCE = (3, 12, 20260312)  # (major, minor, snapshot date) of the change
# "3.7.11" (a release) or "3.12-20260312" (a snapshot): mail_version in postconf(5).
_MAIL_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.\d+|-(\d{8}))")
# postconf lives in /usr/sbin, which a non-root PATH often lacks.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def alias_names_for(mail_version: str) -> AliasNames:
    """The form postalias of MAIL_VERSION stores names in; ValueError if it is not one."""
    match = _MAIL_VERSION.fullmatch(mail_version.strip())
    if match is None:
        raise ValueError(f"not a Postfix mail_version: {mail_version!r}")
    major, minor, snapshot = match.groups()
    # A release of a minor version follows all of its snapshots.
    version = (int(major), int(minor), int(snapshot) if snapshot else 99999999)
    return "external" if version >= EXTERNAL_SINCE else "internal"


def installed_alias_names() -> AliasNames:
    """The form the installed postalias stores, from `postconf -dh mail_version`.

    Without Postfix: "internal", which every Postfix finds (3.12 falls back to it).
    Raises ValueError if postconf fails or prints something else than a version.
    """
    postconf = shutil.which("postconf", path=_SEARCH_PATH)
    if postconf is None:
        return "internal"
    done = subprocess.run(
        [postconf, "-dh", "mail_version"], capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise ValueError(f"{postconf} -dh mail_version: {done.stderr.strip() or done.returncode}")
    return alias_names_for(done.stdout)
