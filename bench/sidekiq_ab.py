#!/usr/bin/env python3
"""A/B of keyspace-proxy's CPU per job under the Sidekiq-shaped load, per push style (issue 12).

    python bench/sidekiq_ab.py --baseline-rev 823b3b3                 # working tree vs 823b3b3
    python bench/sidekiq_ab.py --baseline-rev 823b3b3 --py-spy /tmp/spy   # and where the time goes

Starts one redis-server and two keyspace-proxies in front of it (shared mode, namespace `bench`,
admin port on, as bench/run.py runs them): proxy/ of the working tree and proxy/ as of --baseline-rev,
each in its own snapshot with its C hot path compiled. Then, for each push style of
bench/sidekiq_load.py (mixed, pipeline, multi) and --rounds times, runs the load against one proxy then
the other and prints the proxy's CPU per job (utime+stime from /proc over the whole load, divided by
the jobs pushed) and the ratio working tree / baseline of the same round.

With --py-spy DIR, `py-spy record -f raw` (pip install py-spy) samples each proxy during the `multi`
style and the script prints, per proxy, the share of samples under each function of proxy/ (inclusive),
the largest first: a hint of where the difference is, not a measurement of it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (bench/run.py)
import sidekiq_load  # noqa: E402


def spy_summary(path: str, top: int = 15) -> list[str]:
    incl, total = collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            for fr in set(stack.split(";")):
                if "proxy/" in fr:
                    incl[fr] += int(n)
    return [f"  {n / total * 100:5.1f}%  {fr}" for fr, n in incl.most_common(top)] if total else ["  no samples"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-rev", required=True, metavar="REV")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--styles", default="mixed,pipeline,multi")
    ap.add_argument("--py-spy", metavar="DIR", default=None)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="ksp-sk-ab-")
    procs, redis = [], None
    try:
        src, _ = R.snapshot_proxy(tmp, None)
        bsrc, _ = R.snapshot_proxy(tmp, a.baseline_rev, "src-baseline", "--baseline-rev")
        redis = R.start_server("redis")
        names = {"working tree": src, f"@{a.baseline_rev}": bsrc}
        prox = {}
        for name, s in names.items():
            p, _ = R.start_keyspace_proxy(redis.port, tmp, [], s, name, True)
            procs.append(p)
            prox[name] = p
        for style in a.styles.split(","):
            shape = sidekiq_load.Shape(jobs=a.jobs, paced_seconds=0.2, push_style=style)
            jobs = shape.jobs + int(shape.paced_rate * shape.paced_seconds)
            spies = []
            if a.py_spy and style == "multi":
                os.makedirs(a.py_spy, exist_ok=True)
                for name, p in prox.items():
                    out = os.path.join(a.py_spy, f"{name.strip('@').replace(' ', '-')}.txt")
                    spies.append((name, out, subprocess.Popen(
                        ["py-spy", "record", "-p", str(p.pid), "-r", "200", "-f", "raw", "-o", out, "--nonblocking"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            ratios = []
            for rnd in range(1, a.rounds + 1):
                per = {}
                for name, p in prox.items():
                    R.flushall(redis.port)
                    c0 = R.cpu_seconds(p.pid)
                    asyncio.run(sidekiq_load.run(R.HOST, p.port, "", shape))
                    per[name] = (R.cpu_seconds(p.pid) - c0) / jobs * 1e6
                w, b = per.values()
                ratios.append(w / b)
                print(f"{style:8} round {rnd}: " + ", ".join(f"{n} {v:.1f} µs/job" for n, v in per.items())
                      + f"; ratio {w / b:.2f}", flush=True)
            print(f"{style:8} median ratio working tree / @{a.baseline_rev}: {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
            for name, out, sp in spies:
                sp.send_signal(2)      # SIGINT: py-spy writes its file
                sp.wait(30)
                print(f"py-spy, {name} ({style}), share of samples under each proxy/ function:")
                print("\n".join(spy_summary(out)))
        return 0
    except (R.BenchError, sidekiq_load.LoadError, R.ServerStartError) as e:
        print(f"sidekiq_ab: {e}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.stop()
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
