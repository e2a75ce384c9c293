"""bench/run.py --quick still works (issue 3): a smoke check of the benchmark script, not of the figures.

Needs redis-server, redis-benchmark (redis-tools) and nutcracker on PATH: skipped without them,
except with CI=true, where a missing tool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI = os.environ.get("CI", "").lower() == "true"
TOOLS = ["redis-server", "redis-benchmark", "nutcracker"]


@pytest.mark.timeout(90)
def test_bench_quick(tmp_path):
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        msg = f"bench smoke test needs {', '.join(missing)} (apt-get install redis-server redis-tools nutcracker)"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    out = tmp_path / "benchmarks.md"
    # A hand-written notes block must survive a re-run.
    out.write_text("old\n<!-- notes: profile -->\n## Mine\nkeep me\n<!-- /notes: profile -->\ntrailing\n")
    r = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    text = out.read_text()
    assert "| test | direct req/s | twemproxy req/s | keyspace-proxy req/s |" in text
    assert "keyspace-proxy µs/req" in text
    assert "## Targets" in text
    assert "## Machine and versions" in text
    # issue 12 item 6: admin port on as the image runs it, dedicated-mode figures, the Sidekiq-shaped load
    assert "--metrics-listen 127.0.0.1:" in text
    assert "## Dedicated upstream connections" in text and "| keyspace-proxy dedicated |" in text
    assert "## Sidekiq-shaped load" in text
    assert "| keyspace-proxy | " in text.split("## Sidekiq-shaped load", 1)[1]
    assert "<!-- notes: profile -->\n## Mine\nkeep me\n<!-- /notes: profile -->" in text
    assert text.count("<!-- notes: profile -->") == 1
    assert "old\n" not in text and "trailing" not in text


@pytest.mark.timeout(120)
def test_cluster_bench_quick():
    """bench/cluster.py --quick (issue 15 item 7): a three-primary cluster, redis-benchmark
    --cluster straight at it and through pinned and spread routes; prints its notes block."""
    missing = [t for t in ("redis-server", "redis-benchmark") if not shutil.which(t)]
    if missing:
        msg = f"the cluster bench needs {', '.join(missing)} (apt-get install redis-server redis-tools)"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([sys.executable, "bench/cluster.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=110)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = r.stdout
    assert out.startswith("<!-- notes: cluster -->") and out.rstrip().endswith("<!-- /notes: cluster -->")
    for target in ("direct --cluster", "proxy, 3 namespaces", "proxy, 1 namespace", "proxy, spread route"):
        assert out.count(f"| {target} | ") == 2, out
    assert "load average at the end" in out


@pytest.mark.timeout(120)
def test_modes_bench_quick():
    """bench/modes.py (issue 16 items 4-5): shared and dedicated, admin port on and off, with
    direct and twemproxy in the same rounds; prints its tables (figures meaningless here)."""
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        msg = f"bench/modes.py needs {', '.join(missing)} (apt-get install redis-server redis-tools nutcracker)"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([sys.executable, "bench/modes.py", "--no-baseline", "--rounds", "1", "--requests", "2000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    for target in ("direct", "twemproxy", "tree shared admin on", "tree shared admin off",
                   "tree dedicated admin on", "tree dedicated admin off"):
        assert f"| {target} | " in r.stdout, r.stdout
    assert "| tree dedicated admin on / tree shared admin on | **" in r.stdout


@pytest.mark.timeout(120)
def test_per_request_counts():
    """bench/per_request.py calls: Python-visible calls per request under cProfile, a plain
    number (the tables in docs/benchmarks.md, notes "lean", come from it)."""
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        if CI:
            pytest.fail("bench/per_request.py needs redis-server and redis-benchmark")
        pytest.skip("bench/per_request.py needs redis-server and redis-benchmark")
    r = subprocess.run([sys.executable, "bench/per_request.py", "calls", "--mode", "dedicated", "--requests", "2000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    per = float(r.stdout.split(": ")[1].split()[0])
    assert 5 < per < 200, r.stdout
