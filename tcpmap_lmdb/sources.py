"""Parsers for table sources: postmap(1) and aliases(5) syntax.

Pure: they take a file's lines as bytes and yield entries and problems; they
never open files or print. They follow Postfix 3.7 (postfix-maps.md section 3):
readllines() for logical lines, postmap.c's key/value split, and postalias.c's
RFC 822 tokenizer (tok822_scan, tok822_internalize, tok822_externalize).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Container, Iterable, Iterator
from functools import partial
from itertools import chain
from typing import Literal, NamedTuple

from tcpmap_lmdb.dbformat import _BERKELEY_DB, _LMDB_MAGIC, COMPRESSED
from tcpmap_lmdb.postfix import AliasNames

Syntax = Literal["postmap", "aliases"]

# Postfix's ISSPACE(): ASCII whitespace only, so a UTF-8 no-break space is data.
SPACE = " \t\n\r\x0b\x0c"
_SPACE_BYTES = SPACE.encode("ascii")


# NamedTuples rather than dataclasses: a million are made per million lines,
# and a tuple is the cheapest object to create.
class Entry(NamedTuple):
    lineno: int
    key: bytes  # as written: not folded
    value: bytes


class Problem(NamedTuple):
    lineno: int
    reason: str
    fatal: bool = True  # False: a warning, and the line's entry is still stored


class LogicalLine(NamedTuple):
    lineno: int  # the physical line it starts on
    text: str


class _Reject(ValueError):
    """A line that cannot be an entry; the message is the reason."""


# --- logical lines ----------------------------------------------------------


# A UTF-8 byte order mark: postmap keeps it in the key, which no lookup then finds.
_BOM = b"\xef\xbb\xbf"
_BOM_FIX = "postmap would make the mark part of the key: remove it first"


def logical_lines(lines: Iterable[bytes]) -> Iterator[LogicalLine | Problem]:
    """Join physical lines into logical lines as Postfix's readllines() does.

    Blank lines and lines whose first non-space is '#' are skipped, also in the
    middle of a logical line. A line starting with whitespace continues the
    previous one: its LF is dropped and its leading whitespace kept. Comment
    lines are not decoded (old files often have Latin-1 comments); any other
    line must be UTF-8 without NUL, or its whole logical line is a Problem.
    """
    start = 0  # first physical line of the logical line being built; 0: none
    parts: list[str] = []
    problem: Problem | None = None
    for lineno, raw in enumerate(lines, 1):
        line = raw
        if line.endswith(b"\n"):
            line = line[:-1]  # a CR stays: postmap keeps one inside a continued line
        body = line.lstrip(_SPACE_BYTES)
        if not body or body.startswith(b"#"):
            continue
        if len(body) == len(line):
            if start:
                yield problem or LogicalLine(start, "".join(parts))
            start, parts, problem = lineno, [], None
            if body.startswith(_BOM):  # files joined with cat: one began with a mark
                problem = Problem(
                    lineno, f"a byte order mark (EF BB BF) starts the line: {_BOM_FIX}"
                )
        elif not start:
            # Only possible before the first logical line: everything later joins one.
            start, parts = lineno, []
            problem = Problem(lineno, "logical line must not start with whitespace")
        if problem is None:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = Problem(lineno, f"non-UTF-8 input at byte {exc.start + 1}")
                continue
            if "\0" in text:
                problem = Problem(lineno, "NUL byte in input")
                continue
            parts.append(text)
    if start:
        yield problem or LogicalLine(start, "".join(parts))


# --- postmap syntax: key whitespace value -----------------------------------

# postmap.c: the key ends at the first whitespace that is neither quoted nor
# escaped. A backslash escapes the next character (even inside quotes) and both
# backslashes and quotes stay in the key. Alternatives start with distinct
# characters, so matching is linear.
_POSTMAP_KEY = re.compile(r'(?:[^ \t\n\r\x0b\x0c"\\]|\\.?|"(?:[^"\\]|\\.?)*")*', re.DOTALL)


def _postmap_key_end(text: str) -> int:
    match = _POSTMAP_KEY.match(text)
    return match.end() if match else 0


def split_postmap(text: str) -> tuple[str, str]:
    """Split one logical line into (key, value) like postmap.c; raises ValueError."""
    end = _postmap_key_end(text)
    if text.startswith('"', end):
        raise _Reject(f"unbalanced '\"' in '{_excerpt(text)}'")
    key, value = text[:end], text[end:].strip(SPACE)
    if not key or not value:
        raise _Reject("expected format: key whitespace value")
    return key, value


# --- aliases syntax: name: value, value ----------------------------------------

# tok822_opchar: RFC 822 specials plus '|', '%' and '!'. A backslash is never an
# operator when scanning (it escapes), but an atom containing one gets quoted.
_OPERATORS = frozenset('|%!()<>@,;:\\".[]')
_SCAN_SPACE = " \t\r\n"  # IS_SPACE_TAB_CR_LF: what tok822_scan skips; VT and FF are data
_ATOM_STOP = frozenset(_SCAN_SPACE) | _OPERATORS
_ATOM, _QSTRING, _DOMLIT, _COMMENT = "atom", "qstring", "domlit", "comment"
_WORDS = frozenset({_ATOM, _QSTRING, _DOMLIT, _COMMENT})


class _Token(NamedTuple):
    kind: str  # one of the four word kinds, or the operator character itself
    text: str


def _collect(text: str, pos: int, stop: Container[str]) -> tuple[int, str]:
    """tok822's COLLECT: copy up to a char in stop; a backslash makes the next char literal."""
    out: list[str] = []
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 1
            if pos == len(text):
                break
            char = text[pos]
        elif char in stop:
            break
        out.append(" " if char in _SCAN_SPACE else char)
        pos += 1
    return pos, "".join(out)


def _comment(text: str, pos: int) -> tuple[int, str]:
    """A (possibly nested) comment, kept in external form; it may lack its ')'."""
    out, level = ["("], 1
    while pos < len(text):
        char = text[pos]
        out.append(char)
        pos += 1
        if char == "(":
            level += 1
        elif char == ")":
            level -= 1
            if level == 0:
                break
        elif char == "\\" and pos < len(text):
            out.append(text[pos])
            pos += 1
    return pos, "".join(out)


def _needs_quotes(atom: str) -> bool:
    return any(c == " " or c < " " or c == "\x7f" or c in _OPERATORS for c in atom)


def _scan(text: str) -> list[_Token]:
    """tok822_scan(): a flat token list."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        pos += 1
        if char in _SCAN_SPACE:
            continue
        if char == "(":
            pos, body = _comment(text, pos)
            tokens.append(_Token(_COMMENT, body))
        elif char in '"[':
            pos, body = _collect(text, pos, '"' if char == '"' else "]")
            if pos < len(text):
                pos += 1  # the closing character; an unclosed one is closed on output
            tokens.append(_Token(_QSTRING if char == '"' else _DOMLIT, body))
        elif char != "\\" and char in _OPERATORS:
            tokens.append(_Token(char, char))
        else:
            pos, body = _collect(text, pos - 1, _ATOM_STOP)
            tokens.append(_Token(_QSTRING if _needs_quotes(body) else _ATOM, body))
    return tokens


def _space_after(token: _Token, following: _Token) -> bool:
    """tok822_append_space(); a comma always gets its space (see _externalize)."""
    if token.kind == "," or following.kind == "<":
        return True
    return token.kind in _WORDS and following.kind in _WORDS


def _escape(text: str, specials: str) -> str:
    return "".join("\\" + c if c in specials else c for c in text)


def _externalize(tokens: list[_Token]) -> str:
    """tok822_externalize(): the value as postalias stores it, e.g. "a, b, c"."""
    out: list[str] = []
    for index, token in enumerate(tokens):
        if token.kind == _QSTRING:
            out.append('"' + _escape(token.text, '"\\') + '"')
        elif token.kind == _DOMLIT:
            out.append("[" + _escape(token.text, "\\") + "]")
        else:
            out.append(token.text)
        # Postfix 3.7 writes ", " even after a trailing comma.
        if token.kind == "," or (
            index + 1 < len(tokens) and _space_after(token, tokens[index + 1])
        ):
            out.append(" ")
    return "".join(out)


def _internalize(tokens: list[_Token]) -> str:
    """tok822_internalize(): unquoted form, how postalias 3.7 stores a name."""
    out: list[str] = []
    for index, token in enumerate(tokens):
        out.append(f"[{token.text}]" if token.kind == _DOMLIT else token.text)
        if index + 1 < len(tokens) and _space_after(token, tokens[index + 1]):
            out.append(" ")
    return "".join(out)


def split_alias(text: str, names: AliasNames = "internal") -> tuple[str, str]:
    """Split one logical line into (name, value) like postalias.c; raises ValueError.

    NAMES is the name's stored form: internal (unquoted, postalias 3.11 and
    earlier) or external (quoted, 3.12 on); postfix.py.
    """
    tokens = _scan(text)
    colon = next((i for i, token in enumerate(tokens) if token.kind == ":"), -1)
    name = tokens[:colon]
    if colon <= 0 or colon == len(tokens) - 1 or any(t.kind == "," for t in name):
        raise _Reject("need name:value pair")
    if any(t.kind in ("@", "%") for t in name):
        raise _Reject("name must be local")
    key = _externalize(name) if names == "external" else _internalize(name)
    return key, _externalize(tokens[colon + 1 :])


# --- detection and the whole file ---------------------------------------------


def detect_syntax(text: str) -> Syntax:
    """Guess the syntax from the first logical line: "name: value" means aliases,
    unless the name has a domain, which aliases(5) refuses ("name must be local"):
    "postmaster@example.com: admin" is a postmap line (postmap warns about it).
    """
    end = _postmap_key_end(text)
    key, value = text[:end], text[end:].strip(SPACE)
    name = key.partition(":")[0]
    if "@" in name and not any(c in name for c in '"\\'):  # a quoted '@' is local
        return "postmap"
    if key.endswith(":"):
        return "aliases"
    if not value and 0 < key.find(":") < len(key) - 1:
        return "aliases"  # "name:value" with no whitespace at all
    return "postmap"


_SPLITTERS: dict[str, Callable[[str], tuple[str, str]]] = {
    "postmap": split_postmap,
    "aliases": split_alias,
}
_ALIAS_FORMAT_WARNING = 'record is in "key: value" format; is this an alias file?'


def parse(
    lines: Iterable[bytes],
    syntax: Syntax | Literal["auto"] = "auto",
    alias_names: AliasNames | Callable[[], AliasNames] = "internal",
) -> tuple[Syntax, Iterator[Entry | Problem]]:
    """The syntax used (detected from the first logical line for "auto"), and
    every entry and problem of the file, in file order. Nothing stops at the
    first problem: a caller sees them all. ALIAS_NAMES is the stored form of
    aliases(5) names, or a function that finds it, called only for aliases.
    """
    items: Iterator[LogicalLine | Problem] = logical_lines(lines)
    if syntax == "auto":
        head: list[LogicalLine | Problem] = []
        for item in items:
            head.append(item)
            if isinstance(item, LogicalLine):
                break
        first = head[-1] if head else None
        syntax = detect_syntax(first.text) if isinstance(first, LogicalLine) else "postmap"
        items = chain(head, items)
    split = _SPLITTERS[syntax]
    if syntax == "aliases":
        names = alias_names() if callable(alias_names) else alias_names
        split = partial(split_alias, names=names)
    return syntax, _entries(items, syntax, split)


def _entries(
    items: Iterable[LogicalLine | Problem], syntax: Syntax, split: Callable[[str], tuple[str, str]]
) -> Iterator[Entry | Problem]:
    for item in items:
        if isinstance(item, Problem):
            yield item
            continue
        try:
            key, value = split(item.text)
        except _Reject as exc:
            yield Problem(item.lineno, str(exc))
            continue
        if syntax == "postmap" and key.endswith(":"):
            yield Problem(item.lineno, _ALIAS_FORMAT_WARNING, fatal=False)
        yield Entry(item.lineno, key.encode("utf-8"), value.encode("utf-8"))


def _excerpt(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- inputs that are no source at all ------------------------------------------

# How many of a source's first bytes not_a_source() needs to see.
HEAD_BYTES = 4096


class NotASource(NamedTuple):
    """What a file is instead of a source, and how to get one from it."""

    what: str  # "an LMDB table", ...
    fix: str  # what to give instead


def not_a_source(head: bytes, name: str) -> NotASource | None:
    """What the file NAME, whose first bytes are HEAD (HEAD_BYTES of them, or all it
    has), is if it is obviously no table source: a table (LMDB, Berkeley DB, cdb),
    compressed data, UTF-16 text, UTF-8 text with a byte order mark, or binary data (a NUL
    byte in its first line); None
    if it may be text. A NUL further down is left to the parser: a text source with a stray NUL
    gets its FILE:LINE error ("NUL byte in input").
    """
    return _table_file(head, name) or _not_text(head, name)


def _table_file(head: bytes, name: str) -> NotASource | None:
    """A table that Postfix or tcpmap-build wrote, by its magic number or layout."""
    # LMDB and Berkeley DB: the magic numbers dbformat.not_a_table reads.
    built_from = "give the text file it was built from"
    if head[16:20] == _LMDB_MAGIC:
        return NotASource(
            "an LMDB table", f"{built_from} (tcpmap-query --dump {name} prints its records)"
        )
    kind = _BERKELEY_DB.get(head[12:16])
    if kind is not None:
        table = name.removesuffix(".db")
        return NotASource(
            f"a Berkeley DB {kind} file (Postfix's {kind}: table)",
            f"{built_from} (postmap -s {kind}:{table} prints its records)",
        )
    if _is_cdb(head):
        table = name.removesuffix(".cdb")
        return NotASource(
            "a cdb table (Postfix's cdb: type)",
            f"{built_from} (postmap -s cdb:{table} prints its records)",
        )
    return None


def _not_text(head: bytes, name: str) -> NotASource | None:
    """Compressed data, UTF-16 text, a UTF-8 byte order mark, or binary data (a NUL in the
    first line)."""
    for magic, compression, cat in COMPRESSED:
        if head.startswith(magic):
            return NotASource(
                f"{compression}-compressed data",
                f"decompress it first, e.g. {cat} {name} | tcpmap-build -o OUTPUT -",
            )
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte order mark
        return NotASource(
            "UTF-16 text", f"convert it to UTF-8 first, e.g. iconv -f UTF-16 -t UTF-8 {name}"
        )
    if head.startswith(b"\xef\xbb\xbf"):  # postmap would keep it in the first key
        return NotASource(
            "UTF-8 text starting with a byte order mark (EF BB BF)",
            "postmap would make the mark part of the first key: remove it first, "
            f"e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {name}",
        )
    first_line = head.split(b"\n", 1)[0]
    nul = first_line.find(b"\x00")
    if nul >= 0:
        return NotASource(
            f"binary data (a NUL byte in its first line, at offset {nul})",
            "give the table's text source file",
        )
    return None


def _is_cdb(head: bytes) -> bool:
    """Whether HEAD starts a cdb file (cr.yp.to/cdb/cdb.txt, as tinycdb writes it).

    cdb has no magic number. Its 2048-byte header holds 256 (position, slots)
    pairs, little-endian 32-bit, pointing at hash tables written one after the
    other past the records: table i+1 starts 8 bytes a slot after table i.
    """
    if len(head) < 2048:
        return False
    pairs = struct.unpack("<512I", head[:2048])
    positions, slots = pairs[0::2], pairs[1::2]
    return positions[0] >= 2048 and all(
        positions[i + 1] == positions[i] + 8 * slots[i] for i in range(255)
    )
