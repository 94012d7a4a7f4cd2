"""Prove that no lookup in an LMDB file can read outside it, for any key.

LMDB trusts its file: a page number, a node offset, a key size or a value size
that leads past the end makes a reader touch memory outside the file, and the
kernel kills it with SIGBUS (or it reads another mapping). So every table is
checked here, as bytes, before LMDB ever maps it (snapshot.py): check() reads
the file the way a lookup does and bounds every pointer a lookup can follow.

What a lookup reads (mdb.c, LMDB 0.9.24 to 0.9.3x; mdb_get -> mdb_cursor_set ->
mdb_page_search -> mdb_page_search_root -> mdb_node_search -> mdb_node_read):

1. The meta page with the higher txnid (mdb_env_pick_meta; a tie picks page 0):
   its page size (mm_psize, the free DB's md_pad), last page (mm_last_pg) and
   the main DB record (md_flags, md_root). Checked: both meta pages carry
   P_META, MDB_MAGIC, data version 1 and the same page size, a power of two;
   (mm_last_pg + 1) * psize fits in the file; md_flags is 0, which is what
   Postfix's slmdb (mdb_open(txn, NULL, 0, ...)) and tcpmap-build write. Any
   other flag (MDB_DUPSORT, MDB_INTEGERKEY, MDB_REVERSEKEY, DUPFIXED) switches
   on code paths and comparators whose reads are not bounded here.
2. Pages by number (mdb_page_get): map + pgno * psize. LMDB refuses
   pgno > mm_last_pg itself; checked again here, with 2 <= pgno (the meta pages
   are not tree pages), and mp_pgno == pgno.
3. On every page: mp_lower and mp_upper (NUMKEYS = (mp_lower - 16) / 2), and
   mp_ptrs[i] for i < NUMKEYS. Checked: 16 <= mp_lower <= mp_upper <= psize, and
   each node, its 8-byte header and its key (mn_ksize bytes) lie between
   mp_upper and the end of the page.
4. Branch pages (P_BRANCH): mdb_node_search compares the key with node keys
   1..NUMKEYS-1, then follows the child page number of one node (mn_lo, mn_hi,
   mn_flags: 48 bits). With NUMKEYS < 2 the index it follows underflows
   (i = NUMKEYS - 1 on a miss), so such pages are refused (LMDB asserts the same
   for every DB but the free list). Every child number is checked as in 2.
5. Leaf pages (P_LEAF and not P_LEAF2): mdb_node_search compares keys
   0..NUMKEYS-1, then mdb_node_read reads the value: NODEDSZ (32 bits) bytes
   right after the key, or, with F_BIGDATA, at 16 bytes into the overflow page
   whose number follows the key. Checked: an in-page value ends inside its
   page; an overflow value starts on a P_OVERFLOW page (2 as above), whose run
   of mp_pages pages holds it, and ends inside the file. Node flags F_SUBDATA
   and F_DUPDATA (sub-databases, duplicates) are refused: they send mdb_get into
   a sub-cursor a flags-0 DB does not have.
6. A lookup treats each page by its own flags, not by its depth, and gives up
   past 32 levels (CURSOR_STACK, MDB_CURSOR_FULL). Checked anyway: all leaves
   at one depth below 32, branches above them.

Besides: the first leaf key that UTF-8 case folding would change
(dbformat.folded_ascii_only), which tells a table postmap built with
smtputf8_enable = no (table.py folds its lookups the same way).

Every page reachable from the root is visited exactly once: a page met twice
(a cycle, or an exponentially shared graph that would make a naive walk run
for ever) is refused. So the check reads each page at most once: its time is
linear in the file size, and a file of P pages yields at most P pages' nodes.
Since every byte a lookup can read is proven to lie inside the file, and the
file is served from a sealed copy that nobody can shrink or change
(snapshot.py), no lookup can fault, whatever its key. Not proven: that keys
are sorted. Unsorted keys can make a lookup miss a key (500), as they would
for Postfix's own lmdb: client; they cannot make it read outside the file.
"""

from __future__ import annotations

import struct
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .dbformat import folded_ascii_only, not_a_table

# mdb.c: page flags, node flags, magic and version, the main DB's index.
P_BRANCH: Final = 0x01
P_LEAF: Final = 0x02
P_OVERFLOW: Final = 0x04
P_META: Final = 0x08
P_LEAF2: Final = 0x20
P_SUBP: Final = 0x40
_KINDS: Final = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP
F_BIGDATA: Final = 0x01
MDB_MAGIC: Final = 0xBEEFC0DE
MDB_DATA_VERSION: Final = 1
PAGE_HEADER: Final = 16  # PAGEHDRSZ: mp_pgno, mp_pad, mp_flags, mp_lower/mp_upper or mp_pages
NODE_HEADER: Final = 8  # NODESZ: mn_lo, mn_hi, mn_flags, mn_ksize
CURSOR_STACK: Final = 32
P_INVALID: Final = (1 << 64) - 1

_HEADER: Final = struct.Struct("<QxxHHH")  # mp_pgno, mp_flags, mp_lower, mp_upper
_NODE: Final = struct.Struct("<HHHH")  # mn_lo, mn_hi, mn_flags, mn_ksize
_OVERFLOW: Final = struct.Struct("<QxxHI")  # mp_pgno, mp_flags, mp_pages
# MDB_meta after the page header: mm_magic, mm_version, mm_address, mm_mapsize,
# mm_dbs[FREE_DBI] (md_pad = mm_psize, ...), mm_dbs[MAIN_DBI], mm_last_pg, mm_txnid.
_META: Final = struct.Struct("<IIQQ" + "IHHQQQQQ" + "IHHQQQQQ" + "QQ")


class Corrupt(Exception):
    """The file is not a table a lookup can read safely; str() says why."""


@dataclass(frozen=True, slots=True)
class Checked:
    """What check() found in a sound file."""

    records: int  # leaf records (keys) of the main database
    # The first key (as stored, NUL included) that UTF-8 case folding would change:
    # proof that the keys were folded ASCII only (dbformat.folded_ascii_only); or None.
    unfolded: bytes | None = None


def check(path: Path, data: bytes | memoryview | object, size: int) -> Checked:
    """Check the LMDB file DATA (SIZE bytes, any buffer); its records, and a key that
    shows ASCII-only folding if there is one.

    Raises Corrupt with a reason naming PATH: "is not a readable LMDB file",
    "is truncated", or "is corrupt: ...".
    """
    # Released on the way out, even by an exception: an mmap with views cannot close.
    with memoryview(data) as whole, whole[:size] as buf:  # type: ignore[arg-type]
        psize, last, flags, root = _pick_meta(path, buf, size)
        if flags != 0:
            raise Corrupt(f"{path} is corrupt: its main database has flags {flags:#x}, not 0")
        if root == P_INVALID:
            return Checked(0)
        return _walk(path, buf, psize, last, root)


# The bytes check_head needs: both meta pages' fields, at the largest page size.
HEAD_BYTES: Final = 65536 + PAGE_HEADER + _META.size


def check_head(path: Path, head: bytes, size: int) -> None:
    """Check the meta pages of the LMDB file PATH of SIZE bytes from HEAD, its first
    HEAD_BYTES bytes (or all of it): what check() finds there, before the file is
    copied (snapshot.py: a copy is memory, and a big file may be no table at all).

    Raises Corrupt as check() does.
    """
    # A short HEAD is all the file has (it shrank since SIZE was read).
    with memoryview(head) as buf:
        _pick_meta(path, buf, size if len(head) >= HEAD_BYTES else len(head))


def _pick_meta(path: Path, buf: memoryview, size: int) -> tuple[int, int, int, int]:
    """(psize, mm_last_pg, main md_flags, main md_root) of the meta page LMDB uses."""
    unreadable = f"{path} is not a readable LMDB file"
    metas: list[tuple[int, int, int, int, int]] = []
    offset = 0
    for _ in range(2):
        if size < offset + PAGE_HEADER + _META.size:
            if offset == 0:  # too short for LMDB: what is it instead?
                raise Corrupt(not_a_table(path, bytes(buf[:64])))
            raise Corrupt(f"{path} is truncated")
        _, page_flags, _, _ = _HEADER.unpack_from(buf, offset)
        meta = _META.unpack_from(buf, offset + PAGE_HEADER)
        magic, version, psize = meta[0], meta[1], meta[4]
        if not page_flags & P_META or magic != MDB_MAGIC:
            # What the file is instead (text, Berkeley DB...), and what to do.
            raise Corrupt(not_a_table(path, bytes(buf[:64])) if offset == 0 else unreadable)
        if version != MDB_DATA_VERSION:
            reason = f"data format version {version}"
            raise Corrupt(not_a_table(path, bytes(buf[:64]), reason))
        if psize & (psize - 1) or not 256 <= psize <= 65536:
            raise Corrupt(f"{path} is corrupt: page size {psize}")
        if metas and psize != metas[0][0]:
            raise Corrupt(f"{path} is corrupt: its meta pages disagree on the page size")
        main_flags, main_root, last, txnid = meta[13], meta[19], meta[20], meta[21]
        metas.append((psize, last, main_flags, main_root, txnid))
        offset = psize
    chosen = metas[metas[0][4] < metas[1][4]]
    psize, last = chosen[0], chosen[1]
    needed = (last + 1) * psize
    if last < 1 or needed > size:
        raise Corrupt(f"{path} is truncated: {size} bytes, its pages need {needed}")
    return psize, last, chosen[2], chosen[3]


def _walk(path: Path, buf: memoryview, psize: int, last: int, root: int) -> Checked:
    """Visit every page reachable from ROOT once; the number of leaf nodes, and a key
    folded ASCII only."""
    tree = _Tree(path, buf, psize, last)
    records = 0
    unfolded: bytes | None = None
    leaf_depth = -1
    stack = [(root, 0)]
    while stack:
        pgno, depth = stack.pop()
        kind, page, lower = tree.page(pgno)
        count = (lower - PAGE_HEADER) >> 1
        if kind == P_BRANCH:
            if count < 2 or depth + 1 >= CURSOR_STACK or 0 <= leaf_depth <= depth:
                raise tree.corrupt(f"branch page {pgno} ({count} keys, depth {depth})")
            stack.extend((child, depth + 1) for child in tree.children(pgno, page, lower))
        elif kind == P_LEAF:
            if leaf_depth < 0:
                leaf_depth = depth
            elif depth != leaf_depth:
                raise tree.corrupt(f"leaf page {pgno} at depth {depth}, not {leaf_depth}")
            tree.records(pgno, page, lower)
            records += count
            if unfolded is None and count:
                unfolded = tree.unfolded(page, lower)
        else:
            raise tree.corrupt(f"page {pgno} has flags {kind:#x} where the tree goes")
    return Checked(records, unfolded)


# Fields are read from a page copied into bytes, byte by byte: page[at] | page[at + 1]
# << 8 is the little-endian u16 at AT. Compiled by mypyc (compiled.py), that is a few
# machine instructions, where a struct call per node cost the compiled check more time
# than pure Python. Pure Python is fastest with a struct call per node instead: the
# loop over a million records (records()) has one form for each (README, Performance),
# chosen by _COMPILED (at the end).


class _Tree:
    """The pages of one file, each checked as it is met."""

    def __init__(self, path: Path, buf: memoryview, psize: int, last: int) -> None:
        self.path = path
        self.buf = buf
        self.psize = psize
        self.last = last
        self.seen = bytearray(last + 1)

    def corrupt(self, why: str) -> Corrupt:
        return Corrupt(f"{self.path} is corrupt: {why}")

    def mark(self, pgno: int) -> None:
        """Note PGNO as visited; refuse it if out of range or visited before."""
        if not 2 <= pgno <= self.last:
            raise self.corrupt(f"page number {pgno} outside pages 2..{self.last}")
        if self.seen[pgno]:
            raise self.corrupt(f"page {pgno} is reached twice (a cycle or a shared page)")
        self.seen[pgno] = 1

    def page(self, pgno: int) -> tuple[int, bytes, int]:
        """(its kind flags, its bytes, mp_lower), once PGNO's header is checked.

        Its node offsets (mp_ptrs) are the u16s from PAGE_HEADER up to mp_lower;
        node() and records() check them."""
        self.mark(pgno)
        psize = self.psize
        page = self.buf[pgno * psize : (pgno + 1) * psize].tobytes()
        stored = int.from_bytes(page[:8], "little")  # mp_pgno, then mp_pad
        flags, lower, upper = _u16(page, 10), _u16(page, 12), _u16(page, 14)
        if stored != pgno:
            raise self.corrupt(f"page {pgno} says it is page {stored}")
        if not PAGE_HEADER <= lower <= upper <= psize or lower & 1:
            raise self.corrupt(f"page {pgno} has bounds {lower}..{upper}")
        return flags & _KINDS, page, lower

    def node(self, pgno: int, page: bytes, i: int) -> int:
        """The offset of the node whose offset is at I (in mp_ptrs), once it is inside
        the page: between mp_upper and the end, room for its header."""
        at = _u16(page, i)
        if not _u16(page, 14) <= at <= self.psize - NODE_HEADER:
            raise self.corrupt(f"page {pgno} has a node outside it")
        return at

    def children(self, pgno: int, page: bytes, lower: int) -> list[int]:
        """The child page numbers of branch page PGNO; its keys are inside it."""
        children = []
        for i in range(PAGE_HEADER, lower, 2):
            at = self.node(pgno, page, i)  # mn_lo, mn_hi, mn_flags: the child; mn_ksize
            if at + NODE_HEADER + _u16(page, at + 6) > self.psize:
                raise self.corrupt(f"a key on page {pgno} runs off it")
            children.append(_u16(page, at) | _u16(page, at + 2) << 16 | _u16(page, at + 4) << 32)
        return children

    def records(self, pgno: int, page: bytes, lower: int) -> None:
        """Check that every node, key and value of leaf page PGNO lies in the file.

        Two forms of one loop, each the faster in its own form of this module: compiled,
        42 against 300 ms for a million records; pure Python, 250 against 550 ms."""
        if _COMPILED:
            self._records_compiled(pgno, page, lower)
        else:
            self._records_pure(pgno, page, lower)

    def _records_compiled(self, pgno: int, page: bytes, lower: int) -> None:
        """records(): each field read byte by byte, a few machine instructions compiled."""
        psize, upper = self.psize, _u16(page, 14)
        for i in range(PAGE_HEADER, lower, 2):
            at = page[i] | page[i + 1] << 8
            if not upper <= at <= psize - NODE_HEADER:
                raise self.corrupt(f"page {pgno} has a node outside it")
            # mn_lo, mn_hi: the value's size; mn_flags; mn_ksize
            size = page[at] | page[at + 1] << 8 | page[at + 2] << 16 | page[at + 3] << 24
            flags = page[at + 4] | page[at + 5] << 8
            data = at + NODE_HEADER + (page[at + 6] | page[at + 7] << 8)
            if flags or data + size > psize:
                self.unusual(pgno, page, data, size, flags)

    def _records_pure(self, pgno: int, page: bytes, lower: int) -> None:
        """records(): one struct call per node, the fewest Python operations."""
        psize, upper = self.psize, _u16(page, 14)
        pointers = struct.unpack_from(f"<{(lower - PAGE_HEADER) >> 1}H", page, PAGE_HEADER)
        if pointers and (min(pointers) < upper or max(pointers) > psize - NODE_HEADER):
            raise self.corrupt(f"page {pgno} has a node outside it")
        node = _NODE.unpack_from
        for at in pointers:
            lo, hi, flags, ksize = node(page, at)  # mn_lo, mn_hi: the value's size
            data = at + NODE_HEADER + ksize
            if flags or data + (lo | hi << 16) > psize:
                self.unusual(pgno, page, data, lo | hi << 16, flags)

    def unusual(self, pgno: int, page: bytes, data: int, size: int, flags: int) -> None:
        """A leaf node with flags, or whose value is not all in its page: a value on
        overflow pages (F_BIGDATA, its page number at DATA), checked; or Corrupt."""
        if flags == 0:
            raise self.corrupt(f"a record on page {pgno} runs off it")
        if flags == F_BIGDATA and data + 8 <= self.psize:
            self.overflow(pgno, int.from_bytes(page[data : data + 8], "little"), size)
        else:
            raise self.corrupt(f"a node on page {pgno} has flags {flags:#x}")

    def unfolded(self, page: bytes, lower: int) -> bytes | None:
        """The first key of a leaf page records() checked that proves ASCII-only
        folding, or None.

        Most pages hold no byte above 0x7f past their node pointers (node headers
        included): one scan in C passes them over."""
        if page[_u16(page, 14) :].isascii():  # from mp_upper on
            return None
        for i in range(PAGE_HEADER, lower, 2):
            start = _u16(page, i) + NODE_HEADER
            key = page[start : start + _u16(page, start - 2)]  # mn_ksize
            if not key.isascii() and folded_ascii_only(key.removesuffix(b"\x00")):
                return key
        return None

    def overflow(self, pgno: int, first: int, size: int) -> None:
        """Check a value of SIZE bytes on the overflow pages from FIRST on."""
        try:
            self.mark(first)
        except Corrupt:
            raise self.corrupt(f"page {pgno} has a value on page {first}") from None
        stored, flags, pages = _OVERFLOW.unpack_from(self.buf, first * self.psize)
        if (
            stored != first
            or flags & _KINDS != P_OVERFLOW
            or PAGE_HEADER + size > pages * self.psize
            or first + pages - 1 > self.last
        ):
            raise self.corrupt(f"the value on page {first} runs off its pages")


def _u16(page: bytes, at: int) -> int:
    """The little-endian 16-bit field at AT (a few instructions once compiled)."""
    return page[at] | page[at + 1] << 8


# Whether this module was compiled by mypyc: its functions are then built-in functions.
# (Not __file__: Debian 12's mypyc 1.0.1 does not set it until the module is imported.)
_COMPILED: Final = not isinstance(_u16, types.FunctionType)
