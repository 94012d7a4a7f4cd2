"""tcpmap-lmdb: Postfix tcp_table(5) lookups served from LMDB tables."""

__version__ = "0.1.0"
