"""The benchmark is run by `make bench`, never by pytest: collect nothing here."""

collect_ignore_glob = ["*"]
