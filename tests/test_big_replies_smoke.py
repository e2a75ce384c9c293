"""bench/big_replies.py --quick still works (issue 11): a smoke check of the script, not of the figures.

Needs redis-server on PATH: skipped without it, except with CI=true, where it is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.timeout(90)
def test_big_replies_quick(tmp_path):
    if not shutil.which("redis-server"):
        msg = "big-replies smoke test needs redis-server (apt-get install redis-server)"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path / "big.md"
    r = subprocess.run([sys.executable, "bench/big_replies.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    for text in (r.stdout, out.read_text()):
        assert "| target | GET 1 MiB s | proxy / direct |" in text
        assert "| target | proxy RSS before MB | proxy peak RSS MB |" in text
        for row in ("| direct |", "| proxy shared |", "| proxy dedicated |"):
            assert text.count(row) == 3, row  # the GET table and the two slow-reader tables
