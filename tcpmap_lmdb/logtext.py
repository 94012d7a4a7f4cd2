"""Client-sent text made safe for a log line: nothing a client sends can end a line,
start a forged one, or drive the admin's terminal.
"""

from __future__ import annotations


def printable(data: bytes | str) -> str:
    """DATA for a log line: printable characters as they are, everything else as ``\\xNN``.

    Bytes are read as UTF-8, so a key in any script stays readable; each byte of
    a character that is not printable (str.isprintable: control characters such
    as LF, CR and ESC, format characters such as U+2028 and the bidi overrides,
    tab too) and each byte that is not UTF-8 becomes ``\\xNN`` (two lowercase hex
    digits). A backslash becomes ``\\\\``, so the result reads back unambiguously.
    A str is taken as decoded with surrogateescape (lone surrogates are the bytes
    they stand for). tcp_table keys, %XX-quoted by Postfix, keep their %XX as sent.
    """
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
    if text.isprintable() and "\\" not in text:
        return text  # the usual case
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogateescape"))
    return "".join(out)
