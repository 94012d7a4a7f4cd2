"""Crafted LMDB files: a real small table, then bytes patched where a lookup follows a pointer.

Each crafter takes the bytes of base_table() (a real table: meta pages, a branch root, leaf
pages and one value on overflow pages) and returns a damaged copy. The layout is LMDB 0.9's
(mdb.c): a 16-byte page header (mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper or mp_pages),
then mp_ptrs (u16 node offsets); a node is mn_lo, mn_hi, mn_flags, mn_ksize (u16 each), its
key, then its value (or, with F_BIGDATA, the number of its first overflow page). Written
here from mdb.c, independently of tcpmap_lmdb/verify.py, which they test.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import lmdb

P_BRANCH, P_LEAF, P_OVERFLOW, P_LEAF2 = 0x01, 0x02, 0x04, 0x20
F_BIGDATA, F_DUPDATA = 0x01, 0x04
MAIN = 16 + 24 + 48  # offset of the main DB record in a meta page
MAIN_FLAGS, MAIN_ENTRIES, MAIN_ROOT = MAIN + 4, MAIN + 32, MAIN + 40
LAST_PG, TXNID = MAIN + 48, MAIN + 56
BIG_VALUE = b"B" * 10_000  # the value of key "big", on overflow pages


def base_table(path: Path) -> bytes:
    """A real table of 301 records (keys key000..key299 and big), NUL-terminated as Postfix
    writes them: a branch root over leaf pages, and BIG_VALUE on overflow pages."""
    records = {f"key{i:03d}\0".encode(): f"value-{i:03d}-{'v' * 30}\0".encode() for i in range(300)}
    records[b"big\0"] = BIG_VALUE + b"\0"
    env = lmdb.open(str(path), subdir=False, lock=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in sorted(records.items()):
            txn.put(key, value)
    env.sync(True)
    env.close()
    return path.read_bytes()


class Layout:
    """Where things are in a file: page size, the meta page in use, and pages by kind."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.psize = struct.unpack_from("<I", data, 16 + 24)[0]  # mm_psize (free DB md_pad)
        txnids = [struct.unpack_from("<Q", data, page * self.psize + TXNID)[0] for page in (0, 1)]
        self.meta = (txnids[0] < txnids[1]) * self.psize  # the offset of the meta in use
        self.root = self.u64(self.meta + MAIN_ROOT)
        self.last = self.u64(self.meta + LAST_PG)

    def u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.data, offset)[0])

    def flags(self, pgno: int) -> int:
        return int(struct.unpack_from("<H", self.data, pgno * self.psize + 10)[0])

    def pages(self, kind: int) -> list[int]:
        return [p for p in range(2, self.last + 1) if self.flags(p) & 0x7F == kind]

    def nodes(self, pgno: int) -> list[int]:
        """The offsets (in the file) of the nodes of page PGNO, in key order."""
        base = pgno * self.psize
        lower = struct.unpack_from("<H", self.data, base + 12)[0]
        count = (lower - 16) // 2
        return [base + o for o in struct.unpack_from(f"<{count}H", self.data, base + 16)]

    def leaf_of(self, key: bytes) -> tuple[int, int]:
        """(page, node offset) of KEY's node on a leaf page."""
        for pgno in self.pages(P_LEAF):
            for node in self.nodes(pgno):
                ksize = struct.unpack_from("<H", self.data, node + 6)[0]
                if bytes(self.data[node + 8 : node + 8 + ksize]) == key:
                    return pgno, node
        raise KeyError(key)


Crafter = Callable[[bytes], bytes]


def _patch(data: bytes, *edits: tuple[str, int, int]) -> bytes:
    out = bytearray(data)
    for fmt, offset, value in edits:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _both_metas(data: bytes, fmt: str, field: int, value: int) -> bytes:
    psize = Layout(data).psize
    return _patch(data, (fmt, field, value), (fmt, psize + field, value))


def leaf_page(pgno: int, psize: int, nodes: list[tuple[int, bytes, int, bytes]]) -> bytes:
    """A leaf page PGNO holding NODES (flags, key, mn_lo|mn_hi, the bytes after the key)."""
    page = bytearray(psize)
    upper = psize
    pointers = []
    for flags, key, size, rest in nodes:
        node = struct.pack("<HHHH", size & 0xFFFF, size >> 16, flags, len(key)) + key + rest
        upper -= len(node) + len(node) % 2
        page[upper : upper + len(node)] = node
        pointers.append(upper)
    lower = 16 + 2 * len(pointers)
    struct.pack_into("<QHHHH", page, 0, pgno, 0, P_LEAF, lower, upper)
    struct.pack_into(f"<{len(pointers)}H", page, 16, *pointers)
    return bytes(page)


def branch_page(pgno: int, psize: int, children: list[tuple[bytes, int]]) -> bytes:
    """A branch page PGNO whose nodes are (key, child page number)."""
    nodes = [(child >> 32, key, child & 0xFFFFFFFF, b"") for key, child in children]
    page = bytearray(leaf_page(pgno, psize, nodes))
    struct.pack_into("<H", page, 10, P_BRANCH)
    return bytes(page)


def _with_pages(data: bytes, pages: dict[int, bytes], root: int, entries: int) -> bytes:
    """DATA with PAGES written (growing the file) and the meta in use pointing at ROOT."""
    layout = Layout(data)
    last = max(layout.last, *pages)
    out = bytearray(data) + bytes(max(0, (last + 1) * layout.psize - len(data)))
    for pgno, page in pages.items():
        out[pgno * layout.psize : (pgno + 1) * layout.psize] = page
    meta = layout.meta
    struct.pack_into("<Q", out, meta + MAIN_ROOT, root)
    struct.pack_into("<Q", out, meta + MAIN_ENTRIES, entries)
    struct.pack_into("<Q", out, meta + LAST_PG, last)
    struct.pack_into("<H", out, meta + MAIN + 6, 1)  # md_depth
    return bytes(out)


# --- the crafters ---------------------------------------------------------------------------


def halves_meet(data: bytes) -> bytes:
    """Issue 11's file: cursor order a b | c* | c z with 4 entries claimed; c*'s value is
    64 MiB long, in a file of a few pages."""
    layout = Layout(data)
    pgno = layout.last + 1
    nodes = [
        (0, b"a\0", 2, b"1\0"),
        (0, b"b\0", 2, b"2\0"),
        (0, b"c\0", 64 << 20, b"3\0"),
        (0, b"c\0", 2, b"4\0"),
        (0, b"z\0", 2, b"5\0"),
    ]
    return _with_pages(data, {pgno: leaf_page(pgno, layout.psize, nodes)}, pgno, 4)


def leaf_node_offset(data: bytes) -> bytes:
    """A leaf node's offset (mp_ptrs) points past its page."""
    layout = Layout(data)
    pgno = layout.pages(P_LEAF)[0]
    return _patch(data, ("<H", pgno * layout.psize + 16 + 2, 0xFFF8))


def branch_node_offset(data: bytes) -> bytes:
    """A branch node's offset points past its page."""
    layout = Layout(data)
    return _patch(data, ("<H", layout.root * layout.psize + 16 + 2, 0xFFF0))


def branch_key_size(data: bytes) -> bytes:
    """A key in a branch page claims 65535 bytes: a lookup compares past the page."""
    layout = Layout(data)
    return _patch(data, ("<H", layout.nodes(layout.root)[1] + 6, 0xFFFF))


def branch_child_past_end(data: bytes) -> bytes:
    """A branch node's child page number is far past the end of the file."""
    layout = Layout(data)
    node = layout.nodes(layout.root)[1]
    return _patch(data, ("<H", node, 0xFFFF), ("<H", node + 2, 0x00FF))


def root_past_end(data: bytes) -> bytes:
    """The meta page's root page number is past the end of the file."""
    layout = Layout(data)
    return _patch(data, ("<Q", layout.meta + MAIN_ROOT, layout.last + 5))


def record_size(data: bytes) -> bytes:
    """An in-page value claims 64 MiB."""
    layout = Layout(data)
    _, node = layout.leaf_of(b"key000\0")
    return _patch(data, ("<H", node + 2, 0x0400))


def overflow_page_number(data: bytes) -> bytes:
    """The big value's overflow page number is past the end of the file."""
    layout = Layout(data)
    _, node = layout.leaf_of(b"big\0")
    return _patch(data, ("<Q", node + 8 + 4, layout.last + 1000))


def overflow_size(data: bytes) -> bytes:
    """The big value claims 4 GiB - 1 bytes: more than its overflow pages, past the file."""
    layout = Layout(data)
    _, node = layout.leaf_of(b"big\0")
    return _patch(data, ("<H", node, 0xFFFF), ("<H", node + 2, 0xFFFF))


def overflow_count(data: bytes) -> bytes:
    """The big value's first overflow page says the run is one page long."""
    layout = Layout(data)
    _, node = layout.leaf_of(b"big\0")
    first = layout.u64(node + 8 + 4)
    return _patch(data, ("<I", first * layout.psize + 12, 1))


def one_key_branch(data: bytes) -> bytes:
    """The root branch page holds one key: a lookup that misses would follow index -1."""
    layout = Layout(data)
    return _patch(data, ("<H", layout.root * layout.psize + 12, 16 + 2))


def dupsort_main(data: bytes) -> bytes:
    """The main database claims MDB_DUPSORT, which Postfix never writes."""
    return _both_metas(data, "<H", MAIN_FLAGS, 0x04)


def dupdata_node(data: bytes) -> bytes:
    """A leaf node claims F_DUPDATA (a sub-database of duplicates) in a flags-0 DB."""
    layout = Layout(data)
    _, node = layout.leaf_of(b"key000\0")
    return _patch(data, ("<H", node + 4, F_DUPDATA))


def leaf2_page(data: bytes) -> bytes:
    """A leaf page flagged P_LEAF2 (fixed-size keys at md_pad strides)."""
    layout = Layout(data)
    pgno = layout.pages(P_LEAF)[0]
    return _patch(data, ("<H", pgno * layout.psize + 10, P_LEAF | P_LEAF2))


def cycle(data: bytes) -> bytes:
    """A branch page whose second child is the branch page itself."""
    layout = Layout(data)
    node = layout.nodes(layout.root)[1]
    root = layout.root
    return _patch(data, ("<H", node, root & 0xFFFF), ("<H", node + 2, root >> 16 & 0xFFFF))


def shared_graph(data: bytes, levels: int = 30) -> bytes:
    """LEVELS branch pages, each with two children that are both the next one, over one
    leaf: 2**LEVELS paths to the leaf, which a walk that follows every path never ends."""
    layout = Layout(data)
    first = layout.last + 1
    leaf = first + levels
    pages = {leaf: leaf_page(leaf, layout.psize, [(0, b"a\0", 2, b"1\0")])}
    for level in range(levels):
        pgno = first + level
        child = pgno + 1
        pages[pgno] = branch_page(pgno, layout.psize, [(b"", child), (b"m\0", child)])
    return _with_pages(data, pages, first, 1)


CRAFTERS: dict[str, tuple[Crafter, str]] = {
    # name: (crafter, what the refusal says)
    "halves-meet": (halves_meet, "runs off"),
    "leaf-node-offset": (leaf_node_offset, "node outside"),
    "branch-node-offset": (branch_node_offset, "node outside"),
    "branch-key-size": (branch_key_size, "runs off"),
    "branch-child-past-end": (branch_child_past_end, "outside pages"),
    "root-past-end": (root_past_end, "outside pages"),
    "record-size": (record_size, "runs off"),
    "overflow-page-number": (overflow_page_number, "has a value on page"),
    "overflow-size": (overflow_size, "runs off its pages"),
    "overflow-count": (overflow_count, "runs off its pages"),
    "one-key-branch": (one_key_branch, "1 keys"),
    "dupsort-main": (dupsort_main, "flags 0x4"),
    "dupdata-node": (dupdata_node, "flags 0x4"),
    "leaf2-page": (leaf2_page, "flags 0x22"),
    "cycle": (cycle, "reached twice"),
    "shared-graph": (shared_graph, "reached twice"),
}
