"""The performance benchmark (`make bench`, or `.venv/bin/python -m tests.bench`).

Not part of the test suite: conftest.py keeps pytest out of this directory.
"""
