"""Shared against dedicated upstream mode, admin port on against off, this tree against a
baseline revision: CPU per request and throughput of each, in interleaved rounds, with
direct Redis and twemproxy in the same rounds (issue 16 items 4 and 5). Prints a markdown
report; nothing is written to docs/ (copy it into a hand-written notes block).

    python bench/modes.py --baseline-rev main            # 5 rounds, -c 50 -P 1 -t set,get
    python bench/modes.py --rounds 3 --pipeline 16 --requests 400000
    python bench/modes.py --no-baseline --rounds 1 --requests 5000   # smoke check
    python bench/modes.py --modes shared --rounds 9      # admin port on against off, more rounds

Every keyspace-proxy target is `python -m proxy` of one snapshot (bench/run.py's
snapshot_proxy: the working tree, or `git archive` of the baseline with its C hot path
compiled from its own source) in add mode, namespace `bench`, with `--upstream-mode`
shared or dedicated and with or without `--metrics-listen` (the admin port: latency
histograms kept). All targets stand in front of one redis-server; each round runs
redis-benchmark once against every target, one after another. CPU is utime and stime
from /proc/<pid>/stat around each run, divided by the requests sent; ratios are medians
of per-round ratios (min-max in brackets), so a slow moment of the shared machine
weighs on both sides of a ratio alike. Exit status as bench/run.py: 1 broken, 2 a tool
missing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run  # noqa: E402
from proxy.embedded import start_server  # noqa: E402


cpu_split = run.cpu_split


def ratio(xs: list[float], ys: list[float]) -> str:
    r = [a / b for a, b in zip(xs, ys) if b]
    if not r:
        return "n/a"
    return f"**{statistics.median(r):.2f}** ({min(r):.2f}-{max(r):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline-rev", default="main", metavar="REV",
                    help="also measure proxy/ as of this commit (default main)")
    ap.add_argument("--no-baseline", action="store_true", help="only the working tree")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--requests", type=int, default=100000, help="per test per run (redis-benchmark -n)")
    ap.add_argument("--tests", default="set,get")
    ap.add_argument("--modes", default="shared,dedicated", help="upstream modes to run (comma-separated)")
    args = ap.parse_args(argv)
    missing = run.check_tools()
    if missing:
        print("bench/modes.py: missing on PATH: " + "; ".join(missing), file=sys.stderr)
        return 2
    cmdline = shlex.join(["python", "bench/modes.py"] + (sys.argv[1:] if argv is None else argv))
    tests = args.tests.split(",")
    bench_args = ["-c", str(args.clients), "-P", str(args.pipeline), "-n", str(args.requests)]
    tmp = tempfile.mkdtemp(prefix="ksp-modes-")
    procs: list[run.Proc] = []
    redis = None
    try:
        srcs = {"tree": run.snapshot_proxy(tmp, None)}
        if not args.no_baseline:
            srcs[args.baseline_rev] = run.snapshot_proxy(tmp, args.baseline_rev, "src-baseline", "--baseline-rev")
        redis = start_server("redis")
        twem, _ = run.start_twemproxy(redis.port, tmp)
        procs.append(twem)
        targets: dict[str, run.Proc | None] = {"direct": None, "twemproxy": twem}
        ports = {"direct": redis.port, "twemproxy": twem.port}
        modes = args.modes.split(",")
        for (rev, (src, _)), mode, admin in itertools.product(srcs.items(), modes, (True, False)):
            name = f"{rev} {mode} admin {'on' if admin else 'off'}"
            p, _ = run.start_keyspace_proxy(redis.port, tmp, ["--upstream-mode", mode], src, name, admin)
            procs.append(p)
            targets[name], ports[name] = p, p.port
        bench = run.Bench(shutil.which("redis-benchmark"))
        n = args.requests * len(tests)
        res: dict[str, list[dict]] = {t: [] for t in targets}
        load0 = os.getloadavg()
        t_start = time.monotonic()
        for rnd in range(args.rounds):
            for name, p in targets.items():
                r0 = cpu_split(redis.process.pid)
                p0 = cpu_split(p.pid) if p else (0.0, 0.0)
                rc, out, err = bench.run(ports[name], tests, bench_args)
                rows = run.parse_csv(out)
                if rc != 0 or any(t not in rows for t in tests):
                    raise run.BenchError(f"redis-benchmark against {name} failed (exit {rc}):\n{out[-1500:]}\n"
                                         f"{err[-1500:]}")
                r1 = cpu_split(redis.process.pid)
                p1 = cpu_split(p.pid) if p else (0.0, 0.0)
                res[name].append({
                    "user": (p1[0] - p0[0]) / n * 1e6, "sys": (p1[1] - p0[1]) / n * 1e6,
                    "proxy": (sum(p1) - sum(p0)) / n * 1e6, "redis": (sum(r1) - sum(r0)) / n * 1e6,
                    "rps": statistics.median(rows[t]["rps"] for t in tests)})
            print(f"round {rnd + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        load1 = os.getloadavg()
        col = lambda name, key: [r[key] for r in res[name]]  # noqa: E731
        med = lambda name, key: statistics.median(col(name, key))  # noqa: E731
        print(f"`{cmdline}`: redis-benchmark -t {args.tests} {' '.join(bench_args)}, {args.rounds} interleaved "
              f"round(s), {time.monotonic() - t_start:.0f} s; load average {load0[0]:.2f} at the start, "
              f"{load1[0]:.2f} at the end; tree: {srcs['tree'][1]}"
              + (f"; baseline: {srcs[args.baseline_rev][1]}" if not args.no_baseline else "") + "\n")
        print("| target | proxy CPU µs/req (user + sys) | redis-server µs/req | req/s (median of tests) "
              "| proxy CPU / twemproxy's | req/s / twemproxy's |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, p in targets.items():
            cpu = "" if p is None else f"{med(name, 'proxy'):.2f} ({med(name, 'user'):.2f} + {med(name, 'sys'):.2f})"
            vs_cpu = "" if p is None or name == "twemproxy" else ratio(col(name, "proxy"), col("twemproxy", "proxy"))
            vs_rps = "" if name == "twemproxy" else ratio(col(name, "rps"), col("twemproxy", "rps"))
            print(f"| {name} | {cpu} | {med(name, 'redis'):.2f} | {med(name, 'rps'):,.0f} | {vs_cpu} | {vs_rps} |")
        print("\nSame-run ratios (median of per-round ratios, min-max), proxy CPU per request and req/s:\n")
        print("| ratio | proxy CPU | req/s |")
        print("|---|---:|---:|")
        for rev in srcs:
            for admin in ("on", "off") if len(modes) == 2 else ():
                a, b = f"{rev} dedicated admin {admin}", f"{rev} shared admin {admin}"
                print(f"| {a} / {b} | {ratio(col(a, 'proxy'), col(b, 'proxy'))} | {ratio(col(a, 'rps'), col(b, 'rps'))} |")
            for mode in modes:
                a, b = f"{rev} {mode} admin on", f"{rev} {mode} admin off"
                print(f"| {a} / {b} | {ratio(col(a, 'proxy'), col(b, 'proxy'))} | {ratio(col(a, 'rps'), col(b, 'rps'))} |")
        if not args.no_baseline:
            for mode, admin in itertools.product(modes, ("on", "off")):
                a, b = f"tree {mode} admin {admin}", f"{args.baseline_rev} {mode} admin {admin}"
                print(f"| {a} / {b} | {ratio(col(a, 'proxy'), col(b, 'proxy'))} | {ratio(col(a, 'rps'), col(b, 'rps'))} |")
    except run.BenchError as e:
        print(f"bench/modes.py: {e}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.stop()
        if redis is not None:
            redis.process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
