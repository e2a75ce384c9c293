"""What one request costs the proxy, counted rather than timed (issue 16 items 4 and 5):
Python-visible calls per request (cProfile's call count: Python functions and the
builtins they call) or system calls per request (`strace -c -f`), under redis-benchmark
-c 50 -P 1 -t set,get, for an upstream mode, admin port on or off, and a proxy/ tree.
Counts do not depend on how busy the machine is, which timings on a shared machine do.

    python bench/per_request.py calls --mode dedicated --admin       # this tree
    python bench/per_request.py calls --mode shared --src /tmp/main  # another checkout (proxy/ built there)
    python bench/per_request.py syscalls --mode dedicated --show 12
    python bench/per_request.py calls --load sidekiq --blocking-pool 16   # per job of bench/sidekiq_load.py
    python bench/per_request.py instructions --load sidekiq --requests 2000   # under valgrind's callgrind

Both start their own redis-server (bench/run.py's) and `python -m proxy` (add mode,
namespace `bench`). With `--load sidekiq` the measured run is bench/sidekiq_load.py's
saturated part (`--requests` jobs, no paced part) and the counts are per job. `calls` runs the proxy twice under cProfile: once with a short warm-up
only (plans made, connections opened), once with the warm-up and the measured run, and
divides the difference by the requests of the measured run. `instructions` does the same
under `valgrind --tool=callgrind` (user-space instructions executed, C and Python alike:
what CPU time measures, without the noise; the proxy runs ~50x slower there, so keep
--requests small). `syscalls` attaches strace
to the proxy (needs strace and ptrace permission) around the measured run.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run  # noqa: E402
from proxy.embedded import free_port, start_server  # noqa: E402


def bench(port: int, n: int, tests: str = "set,get") -> None:
    subprocess.run(["redis-benchmark", "-h", run.HOST, "-p", str(port), "-c", "50", "-P", "1", "-n", str(n),
                    "-t", tests], capture_output=True, check=True)


def sidekiq(port: int, jobs: int) -> None:
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sidekiq_load.py"),
                    "--port", str(port), "--jobs", str(jobs), "--paced-seconds", "0"], capture_output=True, check=True)


def start(src: str, redis_port: int, mode: str, admin: bool, prefix: list[str],
          pool: int | None = None, wrap: list[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = list(wrap) + [sys.executable] + prefix + ["-m", "proxy", "--listen", f"{run.HOST}:{port}", "--upstream",
                                        f"redis://{run.HOST}:{redis_port}/0", "--namespace", run.NAMESPACE,
                                        "--upstream-mode", mode]
    if admin:
        mport = free_port()
        while mport == port:  # (free_port closes its probe: it may give the same port twice)
            mport = free_port()
        argv += ["--metrics-listen", f"{run.HOST}:{mport}"]
    if pool is not None:
        argv += ["--blocking-pool", str(pool)]
    # the Sidekiq-shaped load's EVALSHA needs the app policy (as bench/run.py sets it)
    env = dict(os.environ, PROXY_POLICY="app")
    p = subprocess.Popen(argv, cwd=src, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    proc = run.Proc("keyspace-proxy", port, p, os.devnull)
    run.wait_ping(proc, 300 if wrap else 30)
    return p, port


def callgrind_total(path: str) -> int:
    """Instructions executed in user space, from a callgrind output file's totals line."""
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def callgrind_functions(path: str) -> dict[str, int]:
    """Instructions per function (exclusive), as callgrind_annotate prints them."""
    shown = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", path],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    out: dict[str, int] = {}
    for ln in shown:
        f = ln.split(None, 2)
        if len(f) == 3 and f[0].replace(",", "").isdigit() and f[1].startswith("("):
            name = f[2].split(" [")[0].rsplit(":", 1)[-1]
            out[name] = out.get(name, 0) + int(f[0].replace(",", ""))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["calls", "syscalls", "instructions"])
    ap.add_argument("--mode", choices=["shared", "dedicated"], default="shared")
    ap.add_argument("--admin", action="store_true", help="with --metrics-listen (latency histograms kept)")
    ap.add_argument("--src", default=run.ROOT, help="a directory holding proxy/ (default: this tree)")
    ap.add_argument("--requests", type=int, default=20000, help="per test (redis-benchmark -n), or jobs")
    ap.add_argument("--load", choices=["benchmark", "sidekiq"], default="benchmark")
    ap.add_argument("--blocking-pool", type=int, default=None, help="limits.blocking_pool (default: the proxy's)")
    ap.add_argument("--show", type=int, default=0, help="also list the N most frequent calls / system calls")
    ap.add_argument("--by-time", action="store_true", help="calls: list by own time under cProfile (skewed by "
                    "cProfile's cost per call: a hint of where time goes, not a measurement)")
    args = ap.parse_args()
    redis = start_server("redis")
    tmp = tempfile.mkdtemp(prefix="ksp-per-request-")
    n = 2 * args.requests if args.load == "benchmark" else args.requests
    unit = "request" if args.load == "benchmark" else "job"
    label = (f"{args.what}, {args.mode} mode, admin port {'on' if args.admin else 'off'}"
             + (f", blocking_pool {args.blocking_pool}" if args.blocking_pool is not None else "")
             + (", bench/sidekiq_load.py" if args.load == "sidekiq" else "") + f", {args.src}")

    def measured_run(port: int) -> None:
        if args.load == "benchmark":
            bench(port, args.requests)
        else:
            sidekiq(port, args.requests)
    try:
        if args.what == "instructions":
            if not shutil.which("valgrind"):
                print("bench/per_request.py: valgrind is not on PATH", file=sys.stderr)
                return 2
            totals, funcs = [], []
            for measured in (False, True):
                out = os.path.join(tmp, f"{measured}.callgrind")
                p, port = start(args.src, redis.port, args.mode, args.admin, [], args.blocking_pool,
                                ["valgrind", "--tool=callgrind", "--cache-sim=no", "--branch-sim=no",
                                 f"--callgrind-out-file={out}"])
                bench(port, 100, "get")
                if measured:
                    measured_run(port)
                p.send_signal(signal.SIGTERM)
                p.wait(300)
                totals.append(callgrind_total(out))
                if args.show:
                    funcs.append(callgrind_functions(out))
            print(f"{label}: {(totals[1] - totals[0]) / n:,.0f} instructions (user space) per {unit}")
            if args.show:
                base, st = funcs
                rows = sorted(((v - base.get(k, 0)) / n, k) for k, v in st.items())[::-1]
                for per, name in rows[:args.show]:
                    print(f"  {per:9,.0f}  {name}")
        elif args.what == "calls":
            counts = []
            for measured in (False, True):
                out = os.path.join(tmp, f"{measured}.prof")
                p, port = start(args.src, redis.port, args.mode, args.admin, ["-m", "cProfile", "-o", out],
                                args.blocking_pool)
                bench(port, 100, "get")  # warm-up: plans, Specs, connections
                if measured:
                    measured_run(port)
                p.send_signal(signal.SIGTERM)
                p.wait(60)
                counts.append(pstats.Stats(out))
            base, st = counts
            print(f"{label}: {(st.total_calls - base.total_calls) / n:.1f} Python-visible calls per {unit}")
            if args.show:
                # v: (primitive calls, calls, own time, cumulative time); --by-time: own time
                col, fmt = (2, "{:6.2f} µs") if args.by_time else (1, "{:6.2f}")
                scale = 1e6 if args.by_time else 1
                before = {k: v[col] for k, v in base.stats.items()}
                rows = sorted(((v[col] - before.get(k, 0)) * scale / n, k) for k, v in st.stats.items())[::-1]
                for per, (f, line, name) in rows[:args.show]:
                    print(f"  {fmt.format(per)}  {os.path.basename(f)}:{line}({name})")
        else:
            if not shutil.which("strace"):
                print("bench/per_request.py: strace is not on PATH", file=sys.stderr)
                return 2
            p, port = start(args.src, redis.port, args.mode, args.admin, [], args.blocking_pool)
            bench(port, 100, "get")
            out = os.path.join(tmp, "strace.txt")
            st = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(p.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            measured_run(port)
            st.send_signal(signal.SIGINT)
            st.wait(60)
            p.terminate()
            p.wait(60)
            calls = {}
            for line in open(out):
                f = line.split()
                if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                    calls[f[-1]] = int(f[3])
            total = sum(calls.values())
            print(f"{label}: {total / n:.2f} system calls per {unit} (write {calls.get('write', 0) / n:.2f}, "
                  f"read {calls.get('read', 0) / n:.2f}, epoll_pwait {calls.get('epoll_pwait', 0) / n:.3f})")
            for name, c in sorted(calls.items(), key=lambda kv: -kv[1])[:args.show]:
                print(f"  {c / n:8.3f}  {name}")
    finally:
        redis.process.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
