"""Which implementation of the hot path runs: the C module or the Python reference.

proxy/_speedups.c does the per-request work of plain commands (parse, rewrite,
encode) and reply framing in C. It is compiled when the package is installed
where a C compiler is (setup.py, optional); without it, or with
KEYSPACE_PROXY_PURE_PYTHON=1, the Python code does the same work. The C code
only takes inputs it fully understands and hands everything else to the Python
path, so both behave the same; tests/test_speedups.py holds them to that.
"""

from __future__ import annotations

import os

try:
    from proxy import _speedups as C
except ImportError:  # no compiler at install time: the Python path
    C = None

if os.environ.get("KEYSPACE_PROXY_PURE_PYTHON", "") not in ("", "0"):
    C = None

IMPLEMENTATION = "c" if C is not None else "python"
