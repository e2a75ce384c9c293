"""The Sidekiq-shaped load (bench/sidekiq_load.py) directly and through keyspace-proxy with
limits.blocking_pool at several sizes (0: every BRPOP worker moves to a connection of its
own, as before the pool), in interleaved rounds: jobs/s and the Redis connections each
target holds at the end of each part (issue 16, item 3). Prints a markdown table.

    python bench/sidekiq_pool.py [--rounds 3] [--pools 0,16] [--jobs 20000] [--baseline-rev main]

With --baseline-rev REV, proxy/ as of REV (its own snapshot, bench/run.py's snapshot_proxy) runs
with the same pool sizes in the same rounds, as `REV blocking_pool=N`. Against a REV before
the pool, pass `--pools none` (no flag) and choose this tree's size by environment:

    PROXY_BLOCKING_POOL=0 python bench/sidekiq_pool.py --pools none --baseline-rev 29df03d
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run  # noqa: E402
import sidekiq_load  # noqa: E402
from proxy.embedded import start_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pools", default="0,16", help="limits.blocking_pool sizes, comma-separated; `none` passes "
                    "no flag (a baseline before the pool; set PROXY_BLOCKING_POOL for this tree)")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--baseline-rev", default=None, metavar="REV",
                    help="also proxy/ as of this commit, same pool sizes, same rounds")
    args = ap.parse_args()
    shape = sidekiq_load.Shape(jobs=args.jobs)
    tmp = tempfile.mkdtemp(prefix="ksp-bpool-")
    procs = []
    redis = start_server("redis")
    try:
        src, desc = run.snapshot_proxy(tmp, None)
        snaps = [("keyspace-proxy", src)]
        if args.baseline_rev:
            bsrc, bdesc = run.snapshot_proxy(tmp, args.baseline_rev, "src-baseline", "--baseline-rev")
            snaps.append((args.baseline_rev, bsrc))
            desc += f"; baseline {bdesc}"
        targets = {"direct": None}
        for n in args.pools.split(","):
            for label, where in snaps:
                p, _ = run.start_keyspace_proxy(redis.port, tmp, [] if n == "none" else ["--blocking-pool", n], where,
                                                f"{label} blocking_pool={n}")
                procs.append(p)
                targets[p.name] = p
        for p in procs:
            run.wait_ping(p)
        res: dict[str, list[dict]] = {t: [] for t in targets}
        load0 = os.getloadavg()
        for rnd in range(args.rounds):
            for name, p in targets.items():
                port = p.port if p else redis.port
                prefix = "" if p else run.NAMESPACE + ":"
                res[name].append(run.run_sidekiq(name, port, prefix, redis.port, redis.process.pid, p, shape))
                print(f"round {rnd + 1} {name}: {res[name][-1]['saturated']['jobs_per_s']:.0f} jobs/s, "
                      f"{res[name][-1]['saturated']['clients']} connections", file=sys.stderr)
        print(f"{shape.describe()}; {args.rounds} interleaved rounds, medians; load average "
              f"{load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after; {desc}\n")
        print("| target | saturated jobs/s | vs direct | proxy CPU µs/job | Redis connections held (saturated) "
              "| paced p50 ms | Redis connections held (paced) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        direct = [r["saturated"]["jobs_per_s"] for r in res["direct"]]
        for name, rows in res.items():
            jps = [r["saturated"]["jobs_per_s"] for r in rows]
            ratio = "-" if name == "direct" else "**%.2f** (%.2f-%.2f)" % (
                statistics.median(a / b for a, b in zip(jps, direct)),
                min(a / b for a, b in zip(jps, direct)), max(a / b for a, b in zip(jps, direct)))
            cpu = "n/a" if name == "direct" else "%.1f" % statistics.median(r["saturated"]["proxy_us"] for r in rows)
            print(f"| {name} | {statistics.median(jps):,.0f} | {ratio} | {cpu} "
                  f"| {statistics.median(r['saturated']['clients'] for r in rows):.0f} "
                  f"| {statistics.median(r['paced']['p50_ms'] for r in rows):.3f} "
                  f"| {statistics.median(r['paced']['clients'] for r in rows):.0f} |")

        def cpu_ratio(a: str, b: str) -> str:
            r = [x["saturated"]["proxy_us"] / y["saturated"]["proxy_us"] for x, y in zip(res[a], res[b])]
            return "**%.2f** (%.2f-%.2f)" % (statistics.median(r), min(r), max(r))
        pools = args.pools.split(",")
        print("\nSame-run ratios of proxy CPU per job (median of per-round ratios, min-max):\n")
        for label, _ in snaps:
            for n in pools[1:]:
                a, b = f"{label} blocking_pool={n}", f"{label} blocking_pool={pools[0]}"
                print(f"- {a} / {b}: {cpu_ratio(a, b)}")
        if args.baseline_rev:
            for n in pools:
                a, b = f"keyspace-proxy blocking_pool={n}", f"{args.baseline_rev} blocking_pool={n}"
                print(f"- {a} / {b}: {cpu_ratio(a, b)}")
    finally:
        for p in procs:
            p.stop()
        redis.process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
